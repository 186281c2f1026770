"""Cloud TPU VM scripts: create, setup, run, babysit, delete, and ahead-of-time compile checks.

Run them from the repository root, as files (`python tpu/create.py ...`) or as modules
(`python -m tpu.create ...`); every gcloud script takes `--dry-run`. See tpu/README.md.
"""
