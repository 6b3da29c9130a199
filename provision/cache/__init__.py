"""The remote step cache: a step's declared outputs saved to the user's bucket once it has run
and verified, and restored on another box instead of running (in the spirit of Bazel's remote
cache, applied to a runbook).

- `key`: what determines a step's outputs (its fingerprint, its upstream steps' keys or output
  contents, the input files and box facts it declares) hashed into one key;
- `archive`: the outputs as one tar stream through zstd (gzip where the box has no zstd);
- `store`: the bucket (an rclone remote, or `gs://`), written temp object first, manifest last;
- `use`: restoring before a step runs and saving beside its dependents, for `agent exec`.

Box side: standard library only, like the agent core, and Python 3.9.
"""
