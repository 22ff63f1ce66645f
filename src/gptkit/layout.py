"""The names of what a run folder holds, in one place: the trainer, the run log, the report, eval,
`gptkit info` and the checkpoint rotation all find the files by these names.

    runs/NAME/
        config.yaml         the resolved configuration (training/trainer.py)
        checkpoints/        step_00001000.pt ... and best.json (checkpoint/run.py)
        metrics.jsonl       one line per logged step; samples.md, loss.png (training/runlog.py)
        report.md           the run's summary (training/report.py)
        eval.json           eval results, one record per task and checkpoint; eval.md, eval.png (eval/)
        tensorboard/        when the tensorboard tracker is on (tracking.py)

Torch-free, so `gptkit info` and the CLI can use it without importing torch.
"""

CONFIG_FILE = "config.yaml"
CHECKPOINT_FOLDER = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.md"
LOSS_PNG = "loss.png"
REPORT_FILE = "report.md"
EVAL_FILE = "eval.json"
EVAL_MD = "eval.md"
EVAL_PNG = "eval.png"
TENSORBOARD_FOLDER = "tensorboard"

# The records a run writes besides its checkpoints: a folder holding any of them was a run before.
RUN_RECORDS = (METRICS_FILE, SAMPLES_FILE, EVAL_FILE, REPORT_FILE)
