"""Build hpclm._C with CMake (see CMakeLists.txt).

Environment:
  HPCLM_CUDA=auto|1|0   CUDA kernels when nvcc is found (auto), required (1) or off (0)
  HPCLM_CUDA_ARCHS      CMake CUDA architectures (default "80-real;90-real;90-virtual")
  HPCLM_BUILD_JOBS      parallel compile jobs (default: all cores)
  HPCLM_CMAKE_ARGS      extra arguments for the CMake configure step
"""
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={os.path.realpath(sys.executable)}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DHPCLM_CUDA={os.environ.get('HPCLM_CUDA', 'auto')}",
        ]
        if os.environ.get("HPCLM_CUDA_ARCHS"):
            args.append(f"-DHPCLM_CUDA_ARCHS={os.environ['HPCLM_CUDA_ARCHS']}")
        args += shlex.split(os.environ.get("HPCLM_CMAKE_ARGS", ""))
        # One build tree per configuration, each linking its own module, so switching options or
        # interpreters never reuses a stale CMake cache or another configuration's binary; repeated
        # builds are incremental. The module of the configuration just built is then copied into place.
        key = hashlib.sha1("\0".join(args).encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-{key}"
        lib_dir = build_dir / "lib"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("HPCLM_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args,
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}"], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        built = lib_dir / Path(self.get_ext_filename(ext.name)).name
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(built, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # a process that has the old module loaded keeps its own copy


setup(ext_modules=[CMakeExtension("hpclm._C")], cmdclass={"build_ext": CMakeBuild})
