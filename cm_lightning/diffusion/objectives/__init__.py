"""Training objectives: one file per method's loss (EDM's denoising loss, the discrete consistency loss of
CD/CT/iCT/ECT, sCM's continuous-time loss). ``base.py`` says what an objective is."""
