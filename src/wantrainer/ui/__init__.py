"""``wantrainer ui``: a local web page over the schema, the CLI (runs are subprocesses) and a run's files.

- ``app.py``: the Starlette application and its routes (``create_app``);
- ``security.py``: the allowed folders (every path the API takes is resolved and refused outside them) and the
  access token used when the server listens beyond loopback;
- ``schema_view.py``: the config schema as form descriptors; ``configs.py``: list, read, validate and save
  configs (comments kept with tomlkit); ``runs.py``: CLI subprocesses, one per output folder, log and progress;
  ``watch.py``: curves from TensorBoard event files, samples, saved LoRAs and states;
- ``serve.py``: the ``wantrainer ui`` command (uvicorn);
- ``static/``: the page (plain HTML, CSS and JavaScript, no build step, nothing from the network).
"""
