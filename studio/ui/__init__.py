"""The studio's Gradio interface: one module per tab, each with a `build(studio)` that creates and wires it."""
