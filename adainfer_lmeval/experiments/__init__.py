"""Work that runs the backend many times: suites (:mod:`.suite_file`, :mod:`.run_files`, :mod:`.suite_runner`,
:mod:`.suite`, :mod:`.compare`), feature
collection and training (:mod:`.collect`, :mod:`.train`), the paper's study (:mod:`.study`),
hindsight oracles (:mod:`.oracle`, :mod:`.generation_oracle`), the CPU benchmark
(:mod:`.benchmark`) and the GPU check (:mod:`.gpu_check`)."""
