"""Install the ``hf_common`` test tier: transformers' own generic model/config tests, from its sdist.

``python tests_hf/fetch_transformers_tests.py [--dest .hf_tests]`` runs
``pip download --no-binary :all: --no-deps transformers==<installed version>`` and extracts
``tests/test_modeling_common.py`` and ``tests/test_configuration_common.py`` into
``<dest>/transformers_tests/`` (an ignored folder), and installs their one extra dependency,
``parameterized``, into ``<dest>/site`` (``pip install --target``; the project's venv is untouched).

The sdist ships only the top-level common test files, not the helper packages they import; three
small modules stand in for them, each doing only what CGNS's tests need:

* ``exporters/test_export.py``: an empty ``ExportTesterMixin`` (its torch.export tests are not run);
* ``generation/test_utils.py``: an empty ``GenerationTesterMixin`` (CGNS models do not generate; the mixin
  is only used by ``test_generation_tester_mixin_inheritance``, which checks it is *not* inherited);
* ``utils/test_configuration_utils.py``: ``config_common_kwargs = {}``, read only by
  ``ConfigTester.check_config_arguments_init``, which returns before using it for composite configs
  (``CGNSConfig`` has sub-configs).

Idempotent: does nothing when the files for the installed transformers version are already there.
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile

FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")
SHIMS = {
    "exporters/test_export.py": (
        '"""Stand-in: the transformers sdist does not ship tests/exporters (torch.export tests not run)."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"),
    "generation/test_utils.py": (
        '"""Stand-in: the transformers sdist does not ship tests/generation; CGNS models do not generate."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"),
    "utils/test_configuration_utils.py": (
        '"""Stand-in: the transformers sdist does not ship tests/utils. Only check_config_arguments_init reads\n'
        'this, and it returns before doing so for composite configs such as CGNSConfig."""\n\n'
        "config_common_kwargs = {}\n"),
}


def fetch(dest: str, version: str) -> str:
    package_dir = os.path.join(dest, "transformers_tests")
    stamp = os.path.join(package_dir, "VERSION")
    if os.path.isfile(stamp) and open(stamp).read().strip() == version:
        return package_dir
    os.makedirs(package_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        "--no-build-isolation", f"transformers=={version}", "-d", download], check=True)
        archives = [f for f in os.listdir(download) if f.endswith(".tar.gz")]
        if len(archives) != 1:
            raise SystemExit(f"expected one transformers sdist in {download}, got {archives}")
        with tarfile.open(os.path.join(download, archives[0])) as tar:
            prefix = archives[0][: -len(".tar.gz")]
            for name in FILES:
                member = tar.getmember(f"{prefix}/{name}")
                with tar.extractfile(member) as source, open(os.path.join(package_dir, os.path.basename(name)),
                                                             "wb") as target:
                    target.write(source.read())
    for relative, text in SHIMS.items():
        path = os.path.join(package_dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(os.path.join(os.path.dirname(path), "__init__.py"), "a").close()
        with open(path, "w") as handle:
            handle.write(text)
    open(os.path.join(package_dir, "__init__.py"), "a").close()
    site = os.path.join(dest, "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", site, "--upgrade",
                    "parameterized"], check=True)
    with open(stamp, "w") as handle:
        handle.write(version + "\n")
    return package_dir


def main(argv=None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       ".hf_tests"))
    args = parser.parse_args(argv)
    print(fetch(args.dest, transformers.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
