"""``lorahub serve``: the store over the Hugging Face Hub's HTTP API (read only for now).

:func:`~lorahub.serve.app.create_app` builds the Starlette app; ``mapping`` turns repo ids and
revisions into lorahub names and tags; ``files`` holds each served repo's PEFT folder.
"""
