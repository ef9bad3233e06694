"""Hardened inference service: only verified images reach the model.

``medsec serve init`` writes a ready-to-run directory; ``medsec serve --config FILE`` starts
FastAPI/uvicorn with TLS, bearer tokens, per-client rate limits, a signed model checkpoint and
a hash-chained audit log (``medsec audit verify LOG``). See :mod:`medsec.service.app` for the
endpoints and :mod:`medsec.service.gate` for what an image must pass.
"""
