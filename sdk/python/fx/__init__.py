"""fx: the notebook client of an fx federation.

    import fx
    fed = fx.Federation("127.0.0.1:50051", ca="pki/researcher/ca.crt",
                        cert="pki/researcher/researcher.crt",
                        key="pki/researcher/researcher.key", server_name="localhost")
    exp = fed.submit("my-experiment/")          # a directory with plan.yaml
    for ev in exp.metrics(): print(ev.round, ev.task, ev.metrics)
    exp.wait()
    weights = exp.model("best")                 # {name: numpy.ndarray}
"""

from .archive import Archive, pack
from .client import (
    ENDED_STATES,
    DatasetMatch,
    EnvoyInfo,
    Experiment,
    ExperimentStatus,
    Federation,
    ModelInfo,
    Participant,
)
from .errors import ExperimentEnded, FXError, FXTimeout
from .metrics import MetricEvent, format_table, metric_by_round, metrics_table
from .safetensors import SafetensorsError, dump_safetensors, load_safetensors, read_safetensors, save_safetensors

__all__ = [
    "Archive",
    "DatasetMatch",
    "ENDED_STATES",
    "EnvoyInfo",
    "Experiment",
    "ExperimentEnded",
    "ExperimentStatus",
    "FXError",
    "FXTimeout",
    "Federation",
    "MetricEvent",
    "ModelInfo",
    "Participant",
    "SafetensorsError",
    "dump_safetensors",
    "format_table",
    "load_safetensors",
    "metric_by_round",
    "metrics_table",
    "pack",
    "read_safetensors",
    "save_safetensors",
]
