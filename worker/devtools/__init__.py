"""Tools for development and tests, never imported by the job path: the local RunPod-compatible
endpoint (`ftw endpoint`, `ftw submit|status|stream|cancel`), `make demo` (demo.py) and the tiny
local models the demo and the tests train (tiny.py)."""
