"""Finding and fetching model files: nothing here loads a model.

- :mod:`~edgesink.fetch.registry`: the known models (``models/registry.json``), where their files live,
  the default model (from a PyPI wheel);
- :mod:`~edgesink.fetch.hub`: Hugging Face downloads through huggingface-hub, checked against the registry;
- :mod:`~edgesink.fetch.resolve`: what a user typed (a path, a registry name, a Hub spec) to a local file.

``edgesink.load`` (:mod:`edgesink.loading`) joins them to :class:`edgesink.Model`, which knows only a
local file and imports nothing from here.
"""
