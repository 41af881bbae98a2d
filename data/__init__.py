"""Data tools, not needed by a training run that reads real data: the synthetic corpus generator
(`python -m data.synthetic`) and a dataset checker (`python -m data.check`). Layouts: data/README.md."""
