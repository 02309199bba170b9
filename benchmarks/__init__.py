"""flanjax against the Hugging Face PyTorch stack, side by side in one run.

    python -m benchmarks.run                      # CPU default size, < 10 min
    python -m benchmarks.run --gin_file=benchmarks/configs/gpu.gin

See benchmarks/run.py for what is measured and README.md ("Benchmarks") for
the latest table.
"""
