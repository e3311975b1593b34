"""Gradio web UI: streamed, cited answers over the indexed docs, and knowledge-base management."""
