"""The platform's orchestration: configs, data, training core, Ray and MLflow layers."""
import os

# A member's one-off lines at start ("member X: trains on share 1 of 4 ...", what each
# Hikvision option did) are printed by its trial process. Ray's driver folds lines that
# differ only in words holding digits into one "[repeated Nx across cluster]" line, printed
# seconds later, and every member name holds digits (vgg8-...-s0): lines starting
# "member <name>: " are let through as they come. Read when Ray is first imported.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^member \S+: ")

# Ray on this machine stays on loopback, without token auth and quiet: read when Ray is
# first imported, so set here rather than just before ray.init (a driver that imported Ray
# without them retries the machine's external address for ever when a local head runs).
for _key, _value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"),
                     ("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")):
    os.environ.setdefault(_key, _value)

# MLflow prints its own "View run ... at" links when a run ends; they open the UI's GenAI
# overview. The platform prints its own links instead (orchestrator/views/tracking.py: runs_view_url,
# run_page_url), each opening the model-training view.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
