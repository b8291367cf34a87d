"""Gradio apps: CT studies (``ct_app``) and satellite images (``rs_app``), served together by ``launcher``.

``longllava app [ct|rs] --model DIR|demo`` (``apps.cli``) loads the model once and serves both tabs;
``apps.engine`` is the only module that calls the model (through ``longllava.session``).
"""
