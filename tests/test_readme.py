"""The README's "use it from Python" example runs as written (offline), saving into a temporary folder."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Use it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my-cgns" / "model.safetensors").exists()
    assert (tmp_path / "my-cgns" / "processor_config.json").exists()
    assert tuple(namespace["image_embeds"].shape) == (2, 128)
    assert len(namespace["features"]) == 1 and len(namespace["features"][0]) == 128     # the pipelines ran
    printed = capsys.readouterr().out
    assert "tensor" in printed
