"""Framework adapters: ``flask``, ``wsgi``, ``asgi``, ``starlette``, ``fastapi``.

Each is a thin layer over :mod:`metered.integrations._policy`; import the one you use
(``from metered.integrations.flask import Metered, consumes``). Installing the matching
extra pulls in the framework: ``pip install 'metered-billing[flask]'``.
"""
