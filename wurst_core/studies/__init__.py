"""One study per notebook: its parameter schema, the function the notebook calls and its figures.

``data`` (00), ``text_encoder`` (01), ``architecture`` (02), ``stage_a`` / ``stage_b`` / ``stage_c`` (03-05, sharing
``phases``), ``sampling`` (06), ``evaluation`` (07), ``baseline`` (08); ``figures`` holds the plots they share.
"""
