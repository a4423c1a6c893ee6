"""The resolved run config in every logger: W&B's config panel, the CSV logger's hparams.yaml."""

import lightning as L


class LogRunConfig(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        config = getattr(pl_module, "run_config", None)
        if config is not None:
            for logger in trainer.loggers:
                logger.log_hyperparams(config)
