"""The measured claims of lt_finetune: scripts that time, measure and train, and write ``docs/benchmarks.md``.

Entry point: ``python -m benchmarks.run`` (``make bench``); ``--full`` for the long version (``make bench-full``).
"""
