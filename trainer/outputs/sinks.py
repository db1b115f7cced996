"""Where metric rows go: always ``metrics.jsonl``; Weights & Biases and TensorBoard when asked for
and installed (never required)."""

import json
from pathlib import Path


class SinkError(Exception):
    pass


def require(package: str, flag: str) -> None:
    """Fail before anything is written when an asked-for logger is not installed."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise SinkError(f"{flag} needs the {package} package: pip install {package}")


class JsonlSink:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorboardSink:
    def __init__(self, folder: Path):
        require("tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "tokens"):
                    self.writer.add_scalar(f"{row['sae']}/{key}", value, row["tokens"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One wandb run for the sweep; each SAE's metrics under its own name."""

    def __init__(self, project: str, folder: Path, config: dict):
        require("wandb", "--wandb")
        import wandb

        try:
            self.run = wandb.init(project=project, dir=str(folder), config=config)
        except Exception as exc:  # no API key, no network, a bad project name: wandb's own errors
            text = str(exc).strip().splitlines()
            raise SinkError(f"--wandb: {type(exc).__name__}: {text[0] if text else 'could not start a run'} "
                            "(log in with `wandb login`, or set WANDB_MODE=offline; then run again with --resume)") from None

    def log(self, rows: list[dict]) -> None:
        metrics = {f"{row['sae']}/{k}": v for row in rows for k, v in row.items() if k not in ("sae", "step")}
        self.run.log(metrics, step=rows[0]["step"])

    def close(self) -> None:
        self.run.finish()
