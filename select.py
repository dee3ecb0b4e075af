"""Choose the supervised steps of expert trajectories and write the selection file.

    python select.py                                           # critical steps, heuristic oracle
    python select.py selector=critical oracle=openai ratio=0.3 # GPT-4o ($OPENAI_API_KEY)
    python select.py selector=critical oracle=anthropic        # Claude ($ANTHROPIC_API_KEY)
    python select.py oracle=openai_compatible oracle.base_url=http://localhost:8000/v1 \\
        oracle.model=Qwen/Qwen2.5-7B-Instruct                   # a local vLLM/llama.cpp server

This file shares its name with the standard library's ``select`` module, which ``subprocess``
imports. Whenever the project root is on ``sys.path`` (``python train.py``, ``python -m
pytest`` or ``python -c ...`` run from the root), ``import select`` finds this file first; the
block below then loads the real module in its place, so nothing else notices.
"""

if __name__ == "select":  # imported in place of the standard library module
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.abspath(__file__))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("select", _path)
    if _spec is None:
        raise ImportError("the standard library module 'select' was not found")
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    # the import system returns whatever sys.modules holds once this file has run
    sys.modules["select"] = _module
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})

elif __name__ == "__main__":
    import sys

    import hydra
    from omegaconf import DictConfig

    from atlas.utils import one_line_errors, refuse_secret_overrides

    @hydra.main(version_base="1.3", config_path="conf", config_name="select")
    def main(cfg: DictConfig) -> None:
        from atlas.jobs.select import select

        with one_line_errors():
            select(cfg)

    refuse_secret_overrides(sys.argv[1:])
    main()
