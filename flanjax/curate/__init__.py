"""Instruction data curation: python -m flanjax.curate (see cli.py).

generate.py (self-instruct, evolve) -> dedup.py -> select.py -> decontaminate.py, each
reading any training format (records.py) and accounting for every record (report.py).
"""
