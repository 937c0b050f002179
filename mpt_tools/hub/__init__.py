"""Everything mpt-tools does with the Hugging Face Hub, one module per job.

Every ``huggingface_hub`` call of mpt-tools lives in this package, and ``huggingface_hub`` is
imported inside the functions only, so local commands never import it.

* :mod:`.download`: :func:`~.download.download_source` fetches exactly ``adapter_config.json`` and one
  weights file into the Hugging Face cache and checks the weights' sha256 (a leaf: it needs no
  checks); the Hub spec parser, offline detection, token scrubbing and the error messages live here.
* :mod:`.base_model`: a base model's ``config.json`` hidden size against an adapter's ``token_dim``.
* :mod:`.card`: the model card pushed with an adapter.
* :mod:`.push`: :func:`~.push.push_adapter` uploads an adapter folder and its card in one commit.

Every failure is a :class:`~mpt_tools.errors.HubError` with one line naming the repo, revision
and file and what to do. A token never appears in any message, file or result. Nothing is
imported here: ``import mpt_tools.hub.download`` costs only what that module needs.
"""
