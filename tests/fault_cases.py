"""The hostile situations that are not static files: process faults, concurrent writers, files that
change or are not regular, sizes a flag asks for, numbers at the edge, arguments a shell produces.

Each row names the test that proves it; ``docs/make_bad_inputs_table.py`` prints them under the
corpus table in docs/bad-inputs.md and ``tests/test_bad_inputs.py`` checks that every named test
exists.
"""

from __future__ import annotations

from typing import NamedTuple


class FaultCase(NamedTuple):
    name: str
    situation: str
    behaviour: str
    test: str  # "file.py::test_name"


FAULT_CASES: list[FaultCase] = [
    # --- signals and kills ---
    FaultCase(
        "sigterm-mid-write",
        "SIGTERM (`kill`, `timeout`) while init writes a 30 MB adapter, new folder or over one with --force",
        "staging removed; `error: interrupted by SIGTERM; nothing was written`; exit 143; output old or new",
        "test_faults.py::test_a_signal_mid_write_removes_staging_and_exits_128_plus_signal",
    ),
    FaultCase(
        "sighup-mid-write",
        "SIGHUP (terminal closed) mid-write",
        "as SIGTERM; exit 129",
        "test_faults.py::test_a_signal_mid_write_removes_staging_and_exits_128_plus_signal",
    ),
    FaultCase(
        "sigint-mid-write",
        "Ctrl-C mid-write",
        "as SIGTERM; exit 130",
        "test_faults.py::test_a_signal_mid_write_removes_staging_and_exits_128_plus_signal",
    ),
    FaultCase(
        "signal-during-commit",
        "a signal while the finished files are renamed into place",
        "held back until the renames are done, then acted on; the message names what was written",
        "test_faults.py::test_interrupted_message_says_what_was_written",
    ),
    FaultCase(
        "signal-during-native-import",
        "SIGTERM while convert imports torch (sent from import events spread over torch's import)",
        "held back until the import ends, then `error: interrupted by SIGTERM; nothing was written`; exit 143",
        "test_faults.py::test_a_signal_while_torch_imports_takes_effect_after_the_import",
    ),
    FaultCase(
        "signal-while-a-thread-imports",
        "SIGTERM while a worker thread imports torch",
        "the main thread is interrupted at once (the hold is the main thread's only); the worker's import completes",
        "test_faults.py::test_a_signal_while_another_thread_imports_torch_reaches_the_main_thread",
    ),
    FaultCase(
        "second-signal",
        "SIGINT, then SIGTERM or SIGHUP while the first is handled (both held back together, during the"
        " staging removal, while the message is made; SIGINT as a failed write's cleanup begins)",
        "ignored: staging and the parents made for --out removed; `error: interrupted by SIGINT; nothing was"
        " written`; exit 130",
        "test_faults.py::test_a_second_signal_never_interrupts_the_first_ones_cleanup",
    ),
    FaultCase(
        "signal-at-start-up",
        "SIGTERM or SIGINT while the command line imports (before any command runs)",
        "noted, acted on before the arguments are parsed: the one line, 128+N, the error object with --json",
        "test_faults.py::test_a_signal_while_the_command_line_starts_is_one_line",
    ),
    FaultCase(
        "signal-as-it-exits",
        "a signal as Click exits, after the command ran",
        "after a success: `already written: OUT`, 128+N; after a failure that said so: its own line and status",
        "test_faults.py::test_a_signal_as_the_command_exits",
    ),
    FaultCase(
        "signal-in-del",
        "a handler that raises inside a `__del__` (Python prints and drops such an exception)",
        "no `Exception ignored`: acted on at the next point it can be, one line, exit 143",
        "test_faults.py::test_a_signal_python_cannot_pass_on_is_still_acted_on",
    ),
    FaultCase(
        "signal-under-json",
        "SIGTERM mid-write with `--json`",
        "`mpt-tools/error/1` on stdout, `type` `Interrupted`; the one line; exit 143",
        "test_faults.py::test_a_signal_under_json_prints_the_error_object",
    ),
    FaultCase(
        "verify-staging-not-written",
        "SIGINT during `init --verify`, after the adapter is committed into its staging folder",
        "`nothing was written` (never the staging folder or the sha256 cache); nothing left",
        "test_faults.py::test_already_written_names_only_outputs_the_user_got",
    ),
    FaultCase(
        "failed-write-parents",
        "the disk fills while writing `--out pa/pb/out` (pa, pb new)",
        "one line, exit 1; the staging folder, pb and pa removed (folders that existed or are not empty stay)",
        "test_faults.py::test_a_failed_write_removes_the_parents_it_made",
    ),
    FaultCase(
        "sigkill-leftovers",
        "SIGKILL mid-write leaves `.<out>.mpt-tools-<pid>-<hex>.tmp` (beside a new DIR, inside with --force)",
        "the next writer of DIR removes it (and says so on stderr); `stale_staging(DIR)` lists it",
        "test_faults.py::test_sigkill_leftovers_are_removed_by_the_next_writer",
    ),
    FaultCase(
        "staging-of-a-live-writer",
        "staging whose pid is alive, newer than the running process, of another output, or not ours",
        "kept",
        "test_faults.py::test_stale_staging_of_a_live_or_new_writer_is_kept",
    ),
    # --- concurrent writers ---
    FaultCase(
        "two-writers-new-out",
        "two init runs into the same new --out, started together, no --force",
        "exactly one exits 0 and says wrote; the other: `already exists (written by another process meanwhile)`",
        "test_faults.py::test_two_writers_into_one_new_output_exactly_one_wins",
    ),
    FaultCase(
        "two-writers-empty-out",
        "the same into an existing empty folder",
        "the same (files moved under a lock on the folder, re-checked there)",
        "test_faults.py::test_two_writers_into_one_new_output_exactly_one_wins",
    ),
    # --- output trouble ---
    FaultCase(
        "reader-leaves-early",
        "`mpt-tools inspect good | head -1`",
        "no message; the command's own exit status (0)",
        "test_faults.py::test_a_reader_that_leaves_early_is_not_an_error",
    ),
    FaultCase(
        "stdout-full",
        "`mpt-tools init ... > /dev/full`",
        "`error: cannot write to standard output (No space left on device); already written: OUT`, exit 1",
        "test_faults.py::test_a_full_stdout_reports_what_was_written",
    ),
    FaultCase(
        "stdout-full-and-failure",
        "`mpt-tools init ... --json > /dev/full` that fails (refused output; an unknown `--mode`)",
        "its `error:` line on stderr all the same, its own status (1; 2), no traceback",
        "test_faults.py::test_a_full_stdout_and_a_failure_still_print_the_line",
    ),
    FaultCase(
        "stdout-closed",
        "`mpt-tools validate good >&-`, `init ... >&-` (stdout closed)",
        "silent success, exit 0 (a failure: its line on stderr, exit 1)",
        "test_faults.py::test_a_closed_stdout_is_no_error",
    ),
    FaultCase(
        "json-on-internal-error",
        "`--json` and an internal error (a bug)",
        "the error object on stdout, `type` the exception's, `message` the line on stderr; exit 1",
        "test_cli.py::test_json_on_an_internal_error_prints_the_error_object",
    ),
    FaultCase(
        "json-on-failure",
        "`--json` on a failing init, tasks, rerank, convert, export-prompt (and every other command)",
        "`mpt-tools/error/1` object on stdout, one line on stderr, exit 1",
        "test_schemas.py::test_a_failing_command_prints_the_error_schema",
    ),
    FaultCase(
        "cwd-deleted",
        "relative --out in a working folder deleted meanwhile",
        "`error: the current folder no longer exists; cd to one that does`, exit 1",
        "test_faults.py::test_a_deleted_working_folder_is_one_line",
    ),
    # --- files that change or are not regular ---
    FaultCase(
        "fifo-in-folder",
        "a FIFO named adapter_model.safetensors (or .bin, adapter_config.json) in an adapter folder",
        "`is a FIFO (named pipe), not a regular file`, exit 1, no hang",
        "test_hostile_reading.py::test_a_fifo_in_an_adapter_folder_is_refused_without_blocking",
    ),
    FaultCase(
        "fifo-source",
        "a FIFO given as SOURCE",
        "refused without blocking",
        "test_hostile_reading.py::test_a_fifo_given_directly_is_refused",
    ),
    FaultCase(
        "device-source",
        "/dev/null, /dev/zero or a symlink to one as SOURCE",
        "`is a symlink to /dev/zero, which is a character device, not a regular file`",
        "test_hostile_reading.py::test_devices_and_symlinks_to_them_are_named",
    ),
    FaultCase(
        "device-config",
        "adapter_config.json that is a device or a folder",
        "one line naming it",
        "test_hostile_reading.py::test_a_config_that_is_a_device_or_folder_is_refused",
    ),
    FaultCase(
        "fifo-base-model-config",
        "a base model's config.json that is a FIFO",
        "a warning finding, not a hang",
        "test_hostile_reading.py::test_a_fifo_base_model_config_is_a_warning_not_a_hang",
    ),
    FaultCase(
        "truncated-while-reading",
        "the file is truncated after its header was read, or during the read",
        "`changed while reading (it shrank from N to M bytes (truncated))`; no SIGBUS (no mmap)",
        "test_hostile_reading.py::test_a_file_truncated_during_the_read_is_refused",
    ),
    FaultCase(
        "truncated-during-mapped-average",
        "another process truncates a large source while init average sums it from a mapping",
        "the truncate waits (Linux read lease) until the average is done: the mean is the file's as"
        " it was, no SIGBUS; where no lease can be had the file is read with preadv, not mapped",
        "test_hostile_reading.py::test_a_truncation_waits_for_the_mapped_average",
    ),
    FaultCase(
        "replaced-while-reading",
        "the file is replaced or rewritten between two reads",
        "`changed while reading (... was replaced)`",
        "test_hostile_reading.py::test_a_file_replaced_or_rewritten_between_reads_is_refused",
    ),
    FaultCase(
        "sigbus",
        "a file truncated after it was read (the old mmap path died with SIGBUS)",
        "no mapping outlives its read, and none is made without a lease: nothing to fault",
        "test_hostile_reading.py::test_map_is_sigbus_free_when_the_file_is_truncated_after_reading",
    ),
    # --- sizes, numbers at the edge, arguments a shell produces, the environment ---
    FaultCase(
        "empty-out",
        "an unset shell variable as the output: `--out ` (also `--plot`, `--against`, `--cache-dir`)",
        "usage error, exit 2: `empty path (an unset shell variable?)`; nothing written",
        "test_arguments.py::test_an_empty_path_is_a_usage_error",
    ),
    FaultCase(
        "empty-argument",
        "`` as SOURCE, DIR, REPO_ID, `--subfolder`, `--revision`, `--base-model`",
        "usage error, exit 2: `empty value (an unset shell variable?)`",
        "test_arguments.py::test_an_empty_path_is_a_usage_error",
    ),
    FaultCase(
        "size-zero-or-negative",
        "`--target-tasks 0`, `--num-ranks 0`, negative sizes, `--num-transformer-submodules 3`",
        "usage error, exit 2 (never silently replaced)",
        "test_arguments.py::test_a_size_below_one_or_a_negative_seed_is_a_usage_error",
    ),
    FaultCase(
        "seed-negative",
        "`--seed -1`",
        "usage error, exit 2 (numpy's generators take no negative seed)",
        "test_arguments.py::test_a_size_below_one_or_a_negative_seed_is_a_usage_error",
    ),
    FaultCase(
        "seed-too-large",
        "`--seed 18446744073709551616` (2**64) to init or pack",
        "usage error, exit 2 (`0<=x<2**64`: torch's generator overflows above; pack had failed mid-fit);"
        " a ConfigError in the library",
        "test_pack.py::test_a_seed_outside_what_the_generators_take_is_refused_up_front",
    ),
    FaultCase(
        "library-size-zero",
        "a library caller asking for 0 tasks or ranks",
        "an error finding, never replaced by 1",
        "test_arguments.py::test_a_zero_size_is_refused_by_the_library_too_not_replaced",
    ),
    FaultCase(
        "target-beyond-memory",
        "`init --target-tasks 1000000` on the 544 MB stress source (537 GB target)",
        "refused in 0.5 s naming the bytes and the limit (was an internal error after 32 s, 12.7 GB)",
        "test_arguments.py::test_target_tasks_beyond_memory_is_refused_before_anything_is_built",
    ),
    FaultCase(
        "target-over-cap",
        "`--target-tasks 1000001`",
        "`out of range (expected 1..1000000, ...)`, exit 1",
        "test_arguments.py::test_target_tasks_over_the_cap_is_refused",
    ),
    FaultCase(
        "inspect-10-7-tasks",
        "`inspect` of a sparse file whose header claims 10^7 tasks",
        "at most 10,000 per-task rows and a note over every task; 30 s, 250 MB (was 270 s, 12.8 GB)",
        "test_arguments.py::test_inspect_lists_at_most_max_task_rows_and_sums_up_the_rest",
    ),
    FaultCase(
        "similarity-too-many",
        "`inspect --similarity` on more than 4,096 tasks",
        "refused before any work, naming the matrix size",
        "test_arguments.py::test_similarity_of_too_many_tasks_is_refused_before_any_work",
    ),
    FaultCase(
        "plot-exists",
        "`inspect --similarity --plot existing.png` (or a file in the source's folder)",
        "refused before any computation",
        "test_arguments.py::test_an_existing_plot_file_is_refused_before_any_computation",
    ),
    FaultCase(
        "weights-overflow",
        "`--weights 1e308,1e308,1e308` (the sum overflows)",
        "the same factors as `1,1,1` (was all zeros, and verify said ok)",
        "test_arguments.py::test_huge_weights_are_normalised_not_zeroed",
    ),
    FaultCase(
        "prompt-overflow",
        "finite factors whose prompt `P* * (cols[k] @ rows[k])` overflows float32",
        "validate: error `prompt-overflow`; init refuses before writing",
        "test_arguments.py::test_init_refuses_a_target_whose_prompt_overflows",
    ),
    FaultCase(
        "long-select",
        "`tasks --select` with 64,000 entries",
        "written; every list step is one pass",
        "test_arguments.py::test_64000_entry_lists_end_to_end",
    ),
    FaultCase(
        "missing-path-like",
        "a missing `runs/sources` (with `runs/` here), `./x`, `/abs/x`, `x.safetensors`",
        "`no such file or folder` at once, the Hub spelling as a hint; no Hub request",
        "test_arguments.py::test_a_missing_path_says_no_such_file_at_once",
    ),
    FaultCase(
        "diff-negative-zero",
        "`diff A A`",
        "`0`, never `-0` (text and JSON)",
        "test_arguments.py::test_diff_of_identical_prompts_prints_no_negative_zero",
    ),
    FaultCase(
        "validate-k-tasks",
        "`validate --mode shared --target-tasks 4`",
        "plans a 4-task target with init's rules",
        "test_arguments.py::test_validate_plans_a_k_task_target",
    ),
    FaultCase(
        "weights-without-tasks",
        "`--weights` without `--tasks`",
        "`weighted mean of all source tasks` (was `... None`)",
        "test_arguments.py::test_weights_without_tasks_say_all_source_tasks",
    ),
    FaultCase(
        "env-garbage",
        "`MPT_TOOLS_MAX_TENSOR_BYTES=abc` (or -5, 0)",
        "one line, exit 1, before anything runs (a library caller: ConfigError)",
        "test_arguments.py::test_a_garbage_environment_value_is_one_line",
    ),
    FaultCase(
        "verify-many-tasks",
        "`verify` of an adapter with more tasks than a report should list",
        "every task checked; at most 10,000 task rows and failures listed, a note sums up the rest",
        "test_verify.py::test_verify_lists_at_most_max_task_rows_and_sums_up_the_rest",
    ),
]
