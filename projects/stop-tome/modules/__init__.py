"""STOP's ``modules`` package layout (``from modules.clip4clip import CLIP4Clip``), re-exporting ``stop_tome``.

Importable when the working directory (or PYTHONPATH) is ``projects/stop-tome``, as in STOP's repository.
"""
