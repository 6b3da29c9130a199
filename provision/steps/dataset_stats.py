"""`dataset_stats`: normalisation statistics of an RLDS or LeRobot dataset, exact and checked.

Replaces the runbook's hand-run TensorFlow loops (seed 003 §9) and openpi's image-decoding stats
script: RLDS shards are read without TensorFlow (CRCs verified, images skipped), LeRobot parquet
column by column; per dimension it computes mean, std, min, max and exact q01/q99 over every
step, and writes one of three files atomically: the runbook's AE file
`{name: {action, proprio, num_samples}}`, its VLM file `{action, proprio, num_transitions,
num_trajectories}`, or openpi's `{"norm_stats": {"state", "actions"}}` (with `action_horizon`,
actions are taken over openpi's action chunks, clamped at episode ends).

- **Fails** (before reading any data when the metadata shows it) on a missing key — naming the
  keys that exist with their dims, e.g. "no 'observation/state'; found 'observation/joint_state'
  (7 dims)" —, on dims other than `expect`, on no samples, on NaN/inf values, on a damaged shard
  (file and byte offset), and on counts other than `expect_samples` / `expect_episodes`.
- **Warns** (in the log and the step's status) about constant dimensions (std 0) and those with
  q99 - q01 < 1e-4, and about a LeRobot `split_info.json` that is not used.
- **Done** while the output file is the one this step wrote (sha256) and none of the input files
  it read (metadata, shards or parquet files, split file) changed size or mtime since.
- **Verify** re-reads the output: structure of the schema, finite values, dims and counts.

`keys` names the dataset's fields: `{action: ..., state: ...}` (defaults: RLDS `action` and
`observation/state`; LeRobot `action`/`actions` and `observation.state`/`state`). `expect` takes
the names of the file (`action`/`actions`, `proprio`/`state`). For LeRobot, the episodes are
`episodes` if given, else the `split` list of `split_file`, else info.json's `splits[split]`.

Example (RUNBOOK A stats-ae and stats-vlm; B's openpi norm stats from the training split):

```yaml
- id: stats-ae
  kind: dataset_stats
  needs: [data-rlds]
  path: /workspace/data/libero/libero_object_no_noops/libero_object_no_noops/1.0.0
  schema: ae
  output: /workspace/data/libero_object_no_noops/1.0.0/dataset_statistics.json
  keys: {action: action, state: observation/state}
  expect: {action: 7, proprio: 8}
  expect_samples: 66984
- id: stats-vlm
  kind: dataset_stats
  needs: [data-wp]
  path: /workspace/data/libero/libero_object_wp_001/waypoint_filtered_rlds__libero/1.0.0
  schema: vlm
  output: /workspace/data/libero/libero_object_wp_001/norm_stats/dataset_statistics.json
  expect: {action: 7, proprio: 8}
  expect_samples: 8863
  expect_episodes: 454
- id: norm-stats
  kind: dataset_stats
  path: ~/openpi/datasets/openpi_segmented_data
  format: lerobot
  schema: openpi
  split_file: ~/openpi/datasets/openpi_segmented_data/split_info.json
  action_horizon: 10
  output: ~/openpi/assets/pi05_custom/rzh/openpi_segmented_data/norm_stats.json
  expect: {actions: 5, state: 5}
```
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

from provision.agent.files import file_sha256, read_json, write_json_atomic
from provision.errors import ProvisionError, StepFailed
from provision.stats import formats
from provision.stats.errors import DatasetError
from provision.steps.base import Check, Kind, Param, ParamError, StepContext
from provision.steps.common import manifest

_MARKER = "stats.json"
_SHOWN = 3


class DatasetStats(Kind):
    """Compute, check and write a dataset's normalisation statistics."""

    name = "dataset_stats"
    summary = "exact normalisation statistics of an RLDS or LeRobot dataset (no TensorFlow)"
    # google-crc32c: C CRC-32C (also a dependency of google-cloud-storage); without it the
    # numpy fallback checksums shards ~20x slower
    pip = ("numpy", "pyarrow", "google-crc32c")
    params = (
        Param(
            "path",
            "path",
            "the dataset: an RLDS version dir (or a dir above it), or a LeRobot root",
            required=True,
        ),
        Param("output", "path", "the statistics file to write", required=True),
        Param(
            "format", "str", "dataset format", default="auto", choices=("auto", "rlds", "lerobot")
        ),
        Param(
            "schema", "str", "file layout: ae, vlm or openpi", default="ae", choices=formats.SCHEMAS
        ),
        Param("keys", "dict", "dataset fields: {action: KEY, state: KEY}", default={}, items="str"),
        Param(
            "expect",
            "dict",
            "dims per key of the file: {action: 7, proprio: 8}",
            default={},
            items="int",
        ),
        Param("expect_samples", "int", "number of steps (samples / transitions) expected"),
        Param("expect_episodes", "int", "number of episodes (trajectories) expected"),
        Param("split", "str", "split to use (TFDS split; LeRobot split name)", default="train"),
        Param("split_file", "path", "LeRobot: JSON with episode lists per split"),
        Param("episodes", "list", "LeRobot: the episode indices to use", items="int"),
        Param("action_horizon", "int", "openpi action chunk length (stats over chunks)"),
        Param("dataset_name", "str", "the name at the top of an ae file (default: dataset's)"),
    )

    def validate(self, params: dict[str, Any]) -> None:
        for key in ("path", "output", "split_file"):
            if params[key] is not None:
                manifest.validate_local_dir(params[key], key)
        for param in ("keys", "expect"):
            roles: set[str] = set()
            for name, value in params[param].items():
                role = formats.ALIASES.get(name)
                if role is None:
                    raise ParamError(
                        f"'{param}' takes {', '.join(formats.ALIASES)}; got '{name}'", param
                    )
                if role in roles:
                    raise ParamError(f"'{param}' names the {role} twice", param)
                roles.add(role)
                if param == "keys" and not value:
                    raise ParamError(f"keys.{name} must name a field", param)
                if param == "expect" and value < 1:
                    raise ParamError(f"expect.{name} must be at least 1", param)
        for key in ("expect_samples", "expect_episodes"):
            if params[key] is not None and params[key] < 0:
                raise ParamError(f"'{key}' must be >= 0", key)
        if params["action_horizon"] is not None and params["action_horizon"] < 1:
            raise ParamError("'action_horizon' must be at least 1", "action_horizon")
        if any(e < 0 for e in params["episodes"] or []):
            raise ParamError("'episodes' are indices (>= 0)", "episodes")
        if params["format"] == "rlds":
            for key in ("split_file", "episodes"):
                if params[key] is not None:
                    raise ParamError(f"'{key}' applies to LeRobot datasets only", key)
        if params["dataset_name"] is not None and params["schema"] != "ae":
            raise ParamError("'dataset_name' is used by the ae schema only", "dataset_name")

    def describe(self, params: dict[str, Any]) -> str:
        chunks = (
            f", action chunks of {params['action_horizon']}" if params["action_horizon"] else ""
        )
        return (
            f"statistics of {params['path']} ({params['format']}{chunks}) -> "
            f"{params['output']} [{params['schema']}]"
        )

    def check(self, ctx: StepContext) -> Check:
        output = ctx.path(ctx.params["output"])
        if not output.is_file():
            return Check(False, f"{output} does not exist")
        marker = read_json(ctx.workdir / _MARKER, None)
        if not isinstance(marker, dict) or marker.get("output") != str(output):
            return Check(False, f"{output} was not computed by this step")
        if file_sha256(output) != marker.get("output_sha256"):
            return Check(False, f"{output} changed since it was computed")
        changed = _changed_inputs(marker.get("inputs", {}))
        if changed:
            more = f" and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else ""
            return Check(False, f"input files changed since: {', '.join(changed[:_SHOWN])}{more}")
        return Check(
            True,
            f"{output}: {marker.get('num_samples')} samples, {marker.get('num_episodes')} "
            f"episodes, dims {marker.get('dims')}",
        )

    def run(self, ctx: StepContext) -> None:
        from provision.stats.command import describe_result, stats_command

        p = ctx.params
        (ctx.workdir / _MARKER).unlink(missing_ok=True)
        keys = {formats.ALIASES[k]: v for k, v in p["keys"].items()}
        try:
            result = stats_command(
                p["path"],
                fmt=p["format"],
                schema=p["schema"],
                output=p["output"],
                action_key=keys.get("action"),
                state_key=keys.get("state"),
                expect=p["expect"],
                split=p["split"],
                split_file=p["split_file"],
                episodes=p["episodes"],
                action_horizon=p["action_horizon"],
                dataset_name=p["dataset_name"],
                expect_samples=p["expect_samples"],
                expect_episodes=p["expect_episodes"],
                progress=ctx.progress,
            )
        except DatasetError as exc:
            raise StepFailed(exc.message, exc.hint) from None
        except ProvisionError as exc:
            raise StepFailed(exc.message) from None
        for line in describe_result({**result, "warnings": []}):
            ctx.log(line)
        for warning in result["warnings"]:
            ctx.warn(warning)
        output = ctx.path(p["output"])
        write_json_atomic(
            ctx.workdir / _MARKER,
            {
                "output": str(output),
                "output_sha256": file_sha256(output),
                "inputs": _fingerprint(result["inputs"]),
                "num_samples": result["num_samples"],
                "num_episodes": result["num_episodes"],
                "dims": result["dims"],
            },
        )

    def verify(self, ctx: StepContext) -> None:
        p = ctx.params
        output = ctx.path(p["output"])
        marker = read_json(ctx.workdir / _MARKER, {})
        try:
            with open(output, encoding="utf-8") as fh:
                doc = json.load(fh)
            summary = formats.read_document(p["schema"], doc)
        except (OSError, ValueError) as exc:
            raise StepFailed(f"cannot read {output}: {exc}") from None
        except DatasetError as exc:
            raise StepFailed(f"{output}: {exc.message}") from None
        if summary.samples is None:  # openpi files record no counts: use what run counted
            summary = replace(
                summary, samples=marker.get("num_samples"), episodes=marker.get("num_episodes")
            )
        problems = formats.mismatches(
            summary, p["expect"], p["expect_samples"], p["expect_episodes"]
        )
        if p["dataset_name"] and summary.dataset_name != p["dataset_name"]:
            problems.append(f"dataset name '{summary.dataset_name}', expected {p['dataset_name']}")
        if problems:
            raise StepFailed(f"{output}: {'; '.join(problems)}")
        if file_sha256(output) != marker.get("output_sha256"):
            raise StepFailed(f"{output} is not the file this step wrote")


def _fingerprint(paths: list[str]) -> dict[str, list[int]]:
    """Size and mtime of each input file, to notice a dataset replaced under the output."""
    out = {}
    for path in paths:
        st = os.stat(path)
        out[path] = [st.st_size, st.st_mtime_ns]
    return out


def _changed_inputs(recorded: dict[str, list[int]]) -> list[str]:
    changed = []
    for path, (size, mtime_ns) in recorded.items():
        try:
            st = os.stat(path)
        except OSError:
            changed.append(f"{path} (gone)")
            continue
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            changed.append(path)
    return changed


KIND = DatasetStats()
