"""flanjax against the Hugging Face PyTorch stack, side by side in one run.

    python -m benchmarks.run                      # CPU default size, < 10 min
    python -m benchmarks.run --gin_file=benchmarks/configs/gpu.gin

See benchmarks/run.py for what is measured and README.md ("Benchmarks") for
the latest table.
"""

# First, so that a benchmark command (python -m benchmarks.<x>) runs again at once with huge
# pages for malloc's large blocks, as flanjax's commands do: both stacks then run under
# the same allocator settings (recorded in each JSON's machine.huge_pages).
import flanjax  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
