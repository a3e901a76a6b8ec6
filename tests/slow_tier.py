"""Multi-process cases that run in `make test-slow`, not `make test`, each the costlier twin of a case that stays.

`make test` has a 15-minute budget on 2 cores; these cases took 10-160 s each there (2026-12-07). Every guarantee
keeps a representative in `make test` (named after the `#`), so what moves here is a second engine, a second
signal or a second rank count of something already checked, or a whole-run check whose parts are checked faster.
CI runs both tiers (.ci/run), so nothing here goes unchecked.
"""

SLOW_TWINS: frozenset[str] = frozenset(
    {
        # elastic 2 -> 3 -> 1 resume (its parts stay: test_state_roundtrip, test_data_sharding, the ZeRO-LARS
        # partition test); whole runs on three engines are 2-3 minutes each
        "tests/test_elastic.py::test_two_ranks_resumed_on_three_then_one_see_every_sample_once_per_epoch[ddp]",
        "tests/test_elastic.py::test_two_ranks_resumed_on_three_then_one_see_every_sample_once_per_epoch[fsdp]",
        "tests/test_elastic.py::test_two_ranks_resumed_on_three_then_one_see_every_sample_once_per_epoch[deepspeed-zero2]",
        "tests/test_elastic.py::test_zero_optimizer_state_repartitions_on_another_world_size[1]",
        # the kNN monitor on 2 ranks (# test_console's monitor line, test_evaluation_knn, the 7-image uneven shares)
        "tests/test_elastic.py::test_knn_monitor_on_two_ranks_matches_one_process[ddp]",
        "tests/test_elastic.py::test_knn_monitor_on_two_ranks_matches_one_process[fsdp]",
        # faults (# the non-finite steps, the continual run's preemption save, test_resilience's signals, the full-disk
        # save in test_hostile_files)
        "tests/test_reliability.py::test_killed_rank_restarts_from_newest_checkpoint_and_matches",
        "tests/test_reliability.py::test_crash_during_save_keeps_previous_checkpoint_and_keep_last",
        "tests/test_reliability.py::test_preemption_via_agent_and_via_worker_exit_3_and_resume_exactly",
        "tests/test_reliability.py::test_other_preemption_signals_to_the_agent_checkpoint_and_exit_3[SIGUSR2]",
        "tests/test_reliability.py::test_other_preemption_signals_to_the_agent_checkpoint_and_exit_3[SIGTERM]",
        "tests/test_reliability.py::test_second_trainer_on_a_live_out_dir_refuses_then_takes_over_once_it_died",
        # engines (# each engine's LARS step, bf16 on DDP, fp16 FSDP = DDP steps, global batch norm on gloo in
        # test_models, ZeRO-0 LARS, the ZeRO-LARS partitions, the ViT on FSDP with AdamW and layer decay)
        "tests/test_engines.py::test_fp16_loss_scaling_skips_and_counts_overflowing_steps[ddp]",
        "tests/test_engines.py::test_fp16_loss_scaling_skips_and_counts_overflowing_steps[fsdp]",
        "tests/test_engines.py::test_global_batch_norm_in_train_mode_matches_one_process[ddp]",
        "tests/test_engines.py::test_tiny_vit_trust_ratio_optimizers_match_one_process[fsdp-lamb]",
        "tests/test_reliability.py::test_missing_extra_names_the_pip_install[nvidia.dali-data.backend=dali-dali]",
        "tests/test_engines.py::test_bf16_matches_fp32_one_process[fsdp]",
        "tests/test_engines.py::test_bf16_matches_fp32_one_process[deepspeed]",
        "tests/test_engines.py::test_compiled_engine_matches_one_process[ddp]",
        "tests/test_engines.py::test_compiled_engine_matches_one_process[deepspeed]",
        "tests/test_engines.py::test_deepspeed_zero2_sgd_matches_one_process",
        "tests/test_engines.py::test_lars_engine_matches_one_process[deepspeed-zero1]",
        "tests/test_engines.py::test_lars_engine_matches_one_process[deepspeed-zero2]",
        "tests/test_engines.py::test_lars_engine_matches_one_process[deepspeed-zero2-json]",
        "tests/test_engines.py::test_global_batch_norm_in_train_mode_matches_one_process[fsdp]",
        "tests/test_engines.py::test_global_batch_norm_in_train_mode_matches_one_process[deepspeed]",
        "tests/test_engines.py::test_deepspeed_in_a_plain_process_matches_one_process",
        "tests/test_engines.py::test_convnext_fsdp_shards_each_stage_and_matches_one_process",
        "tests/test_engines.py::test_zero_lars_on_partitions_equals_lars_on_whole_tensors[3]",
        "tests/test_engines.py::test_tiny_vit_adamw_layer_decay_engine_matches_one_process[ddp]",
        "tests/test_engines.py::test_tiny_vit_adamw_layer_decay_engine_matches_one_process[deepspeed-zero2]",
        "tests/test_engines.py::test_tiny_vit_trust_ratio_optimizers_match_one_process[deepspeed-zero2-lars]",
        # continual on 2 ranks (# the SCR resume, the continual tests of one process)
        "tests/test_continual_run.py::test_two_ranks_equal_one_process_on_the_global_batch[scr]",
        "tests/test_continual_run.py::test_two_ranks_equal_one_process_on_the_global_batch[er]",
        # launchers and commands (# two torchrun nodes, the config's batch-vs-world rule)
        "tests/test_launch.py::test_two_node_deepspeed_launcher_trains_and_checkpoints",
        "tests/test_trainer.py::test_cli_trains_on_two_torchrun_ranks",
        "tests/test_trainer.py::test_cli_batch_not_divisible_by_world",
        # the probe and the CE classifier on DeepSpeed (# the same test on FSDP2)
        "tests/test_evaluation_probe.py::test_two_ranks_train_probe_and_ce_classifier_as_one_process[deepspeed]",
        "tests/test_trainer.py::test_genscl_with_mixing_resumes_exactly",  # (# test_state_roundtrip's GenSCL run)
        "tests/test_hostile_runs.py::test_ranks_with_different_configs_are_refused_naming_keys_and_ranks[extra1-loss.temperature]",
        "tests/test_data_badfiles.py::test_scan_over_ranks_finds_what_one_process_finds[3]",
        # tools (# the augmentation bench, the loss tests, gpu-check's parts in test_gpu_ready)
        "tests/test_bench.py::test_bench_tool_runs_both_backends_and_writes_json",
        "tests/test_losses.py::test_bench_loss_tool_smoke",
        "tests/test_gpu_ready.py::test_gpu_check_smoke_runs_every_part_and_writes_json",
        # the queue's resume without siblings (# the same test with the momentum encoder and EMA, the queue included)
        "tests/test_objectives_queue.py::test_resume_with_a_queue_is_exact[queue]",
    }
)
