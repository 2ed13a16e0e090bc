"""Search your own videos with a CLIP4Clip model: the library under ``retrieve.py``.

``settings`` (what an index was built with), ``index`` (the files on disk), ``encode`` (the model, texts and videos
to embeddings), ``build`` (creating and updating an index), ``rank`` (scores to ranked results), ``query`` (the
commands' searches), ``page`` (the local web page). This file imports nothing, so the command line can parse its
flags before torch loads.
"""
