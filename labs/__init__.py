"""Gradio chat labs: each `labN_name/app.py` has `build_demo()` and runs with `python -m`."""
