"""`minillm serve`: OpenAI- and Ollama-compatible HTTP APIs over one continuous-batching engine.

See app.py for the app factory (`build_app`) and for running it (`serve`, `run_in_thread`).
"""

from __future__ import annotations

from minillm.serve.app import BackgroundServer, build_app, run_in_thread, serve, start_in_thread

__all__ = ["BackgroundServer", "build_app", "run_in_thread", "serve", "start_in_thread"]
