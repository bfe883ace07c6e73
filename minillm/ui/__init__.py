"""User interfaces on the engine: `chat` (the Gradio chat app factory used by the labs) and
`widgets` (ipywidgets views for the lessons).

Nothing is imported here, so `import minillm` needs neither Gradio nor ipywidgets.
"""
