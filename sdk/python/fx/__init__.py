"""fx: the notebook client of an fx federation.

    import fx
    fed = fx.Federation.from_profile()          # the CLI's settings: $FX_PROFILE, ~/.config/fx/config.yaml
    # or: fx.Federation("127.0.0.1:50051", ca="pki/researcher/ca.crt",
    #                   cert="pki/researcher/researcher.crt",
    #                   key="pki/researcher/researcher.key", server_name="localhost")
    exp = fed.submit("my-experiment/")          # a directory with plan.yaml
    for ev in exp.metrics(): print(ev.round, ev.task, ev.metrics)
    exp.wait()
    weights = exp.model("best")                 # {name: numpy.ndarray}

fx.site, the site library, turns a training script into a participant at a
data site (see its docstring); it needs only numpy, so the client's names
below (which need grpc) are imported when first used.
"""

from .archive import Archive, pack
from .errors import ExperimentEnded, FXError, FXTimeout
from .metrics import MetricEvent, format_table, metric_by_round, metrics_frame, metrics_table
from .profile import Profile, load_profile
from .safetensors import SafetensorsError, dump_safetensors, load_safetensors, read_safetensors, save_safetensors

__all__ = [
    "Archive",
    "DatasetMatch",
    "ENDED_STATES",
    "EnvoyInfo",
    "Evaluation",
    "Experiment",
    "ExperimentEnded",
    "ExperimentStatus",
    "FXError",
    "FXTimeout",
    "Federation",
    "MetricEvent",
    "ModelInfo",
    "Participant",
    "Profile",
    "RunnerLogLine",
    "SafetensorsError",
    "dump_safetensors",
    "format_table",
    "load_profile",
    "load_safetensors",
    "metric_by_round",
    "metrics_frame",
    "metrics_table",
    "pack",
    "read_safetensors",
    "save_safetensors",
]

# The notebook client needs grpc, which a site's interpreter may lack: it is
# imported on first use of one of its names.
_CLIENT_NAMES = {
    "ENDED_STATES",
    "DatasetMatch",
    "EnvoyInfo",
    "Evaluation",
    "Experiment",
    "ExperimentStatus",
    "Federation",
    "ModelInfo",
    "Participant",
    "RunnerLogLine",
}


def __getattr__(name):
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'fx' has no attribute {name!r}")
