"""The human preference study of the paper's §4.2 (Figure 5): collection, storage, simulation and analysis.

One module per job, each importing only the ones above it in this list (and the package's lower floors):

* ``store``: the SQLite (WAL) database of systems, prompts, images, items, raters, showings and judgments, the
  content-addressed image folder beside it, and the CSV export.
* ``design``: which pairs are shown: balanced across prompts and system pairs, attention checks, repeated pairs.
* ``build``: writes a study (images, judge scores, design) into a new database.
* ``service``: the rating flow every client shares (register, next pair, vote), with its validation errors.
* ``page`` and ``server``: the rater page and its ASGI app (FastAPI on uvicorn, loopback by default).
* ``simulate``: raters with known preferences, position bias, ties and noise, through the service or over HTTP;
  and whole simulated studies as count arrays (for interval coverage).
* ``bradley_terry``: Bradley–Terry strengths with ties (``choix``) and their rater bootstrap.
* ``analysis``: Figure 5's numbers and the quality of the data; ``figures``: the plots.
* ``widget``: the same rating flow as an ipywidgets widget in JupyterLab.

The notebook's study (``notebooks/11_preference.ipynb``) is ``wurst_core.studies.preference_study``; the commands
are ``wurst study create|serve|simulate|analyse``. See docs/human_study.md.
"""
