"""What the tests share, and the only place they share it from (no test module imports another, or conftest):

- ``builders``: small nets, modules and a quiet CPU Trainer for tests that run in this process;
- ``launch``: every way a test starts ``train.py`` or ``evaluate.py``, in a subprocess or in this process;
- ``probes``: callbacks a launched run loads (``+callbacks.<name>._target_=helpers.probes.X``) to inject a fault
  or record what each rank did;
- ``scenarios``: multi-run checks that several test modules repeat with their own overrides;
- ``fixtures``: writers of tiny datasets in the layouts the real ones are released in;
- ``wandb_records``: a reader of an offline W&B run's records.

Kept free of imports, since every launched run that loads a probe imports it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

# Shrinks any digits experiment to seconds on a CPU (conf/debug/tiny.yaml, which users run the same way).
TINY = ["+debug=tiny"]
