"""The model wing's training, one concern per module.

config (the fields) and config_validation -> schedule, optimizer, finetune
-> state -> steps (the pmapped step) -> evaluator, run_log, inputs -> loop
(`train_and_evaluate`, what main.py and the notebooks call); distributed
holds the multi-process set-up and the host<->device moves.
"""
