"""KFP components: one per stage, each a thin call into the onceforall library.

Installed as ``onceforall_components`` (the folder is ``components/``).

    from onceforall_components import build
    c = build(image="registry.example.com/onceforall:0.1.0-cpu")
    c.train_teacher(...)              # inside a @dsl.pipeline
    c.train_teacher.python_func(...)  # the plain function, for tests
"""

from __future__ import annotations

from types import SimpleNamespace

DEFAULT_IMAGE = "ghcr.io/onceforall-kfp/onceforall:0.1.0-cpu"


def build(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """Every stage as a lightweight component on ``image``.

    ``install_kfp_package=False``: the image already holds kfp (images/requirements.in), so no pip
    runs when a pod starts, and the local runner uses this environment as it is.
    """
    from kfp import dsl

    from . import stages

    return SimpleNamespace(**{f.__name__: dsl.component(f, base_image=image, install_kfp_package=False)
                              for f in stages.FUNCTIONS})
