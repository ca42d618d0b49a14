import subprocess
import sys


def test_math_layers_do_not_import_lightning():
    code = (
        "import sys, lightning_curvature, lightning_curvature.operators, lightning_curvature.estimators,"
        " lightning_curvature.dynamics, lightning_curvature.isolation, lightning_curvature.plan,"
        " lightning_curvature.options, lightning_curvature.budget;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_callback_is_exported():
    import lightning_curvature

    assert lightning_curvature.CurvatureMonitor.__name__ == "CurvatureMonitor"
