"""``distill demo``: the whole pipeline offline on CPU at toy scale.

* ``runner`` -- ``DemoConfig`` and the orchestrator: every stage is the real command, run as a subprocess
* ``report`` -- ``write_demo_report(out_dir)``: report.json / report.md built from the files on disk
"""
