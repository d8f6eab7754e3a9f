"""Ray Tune search over LR policies, augmentations and the Hikvision recipe options; the
best trials become ensemble members without retraining."""
