"""Training logs: metrics.jsonl, and TensorBoard events written without torch (an MLX-only install can log)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path


def read_events(directory: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar in the TFRecord event files under `directory`."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for file in directory.glob("events.out.tfevents.*"):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_tensorboard_events_without_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None; from pathlib import Path; "
        "from qstar.core.training_log import MetricLog; from qstar.core.train_config import TrainConfig; "
        "log = MetricLog(Path(sys.argv[1]), TrainConfig(tensorboard=True)); "
        "log.write({'split': 'train', 'step': 3, 'loss': 1.5, 'lr': 0.25}); "
        "log.write({'split': 'val', 'step': 3, 'nll_talk': 2.0}); log.close()"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_events(tmp_path / "tensorboard") == {
        ("train/loss", 3): 1.5,
        ("train/lr", 3): 0.25,
        ("val/nll_talk", 3): 2.0,
    }
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]
