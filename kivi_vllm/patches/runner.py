"""Runner hooks: tell the KIVI tail allocator (and FastGen) which request owns each batch
row and when it ends; after each forward, FastGen moves compacted pages and reports them."""

from __future__ import annotations

import functools

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from kivi_vllm.fastgen.device import DEVICE as DEVICE_FASTGEN
from kivi_vllm.fastgen.engine import PROFILE_AT, attach_reports
from kivi_vllm.fastgen.engine import WORKER as FASTGEN
from kivi_vllm.state import STEP


def _profile_at(runner: GPUModelRunner, batch, n: int):
    """Each row's FastGen profiling position: the prompt's end, or the request's
    ``extra_args[PROFILE_AT]`` when earlier."""
    out = batch.num_prompt_tokens[:n].copy()
    for row, req_id in enumerate(batch.req_ids[:n]):
        params = runner.requests[req_id].sampling_params
        at = (params.extra_args or {}).get(PROFILE_AT) if params is not None else None
        if at is not None:
            out[row] = min(out[row], int(at))
    return out


def apply() -> None:
    original_update = GPUModelRunner._update_states

    @functools.wraps(original_update)
    def _update_states(self: GPUModelRunner, scheduler_output):
        result = original_update(self, scheduler_output)
        if STEP.tails is not None:
            ended = set(scheduler_output.finished_req_ids)
            ended |= scheduler_output.preempted_req_ids or set()
            n = self.input_batch.num_reqs
            STEP.update(
                ended,
                self.input_batch.req_ids[:n],
                self.input_batch.num_computed_tokens_cpu[:n],
            )
            if DEVICE_FASTGEN.enabled:  # kivi.fastgen on the GPU
                batch = self.input_batch
                table = batch.block_table.block_tables[0]
                DEVICE_FASTGEN.begin_step(
                    ended, batch.req_ids[:n], batch.num_computed_tokens_cpu[:n],
                    scheduler_output.num_scheduled_tokens, STEP.rows(n)[0],
                    batch.token_ids_cpu, table.num_blocks_per_row[:n], table.block_table.np[:n],
                )
            elif FASTGEN.enabled:  # kivi.fastgen on the CPU
                batch = self.input_batch
                FASTGEN.begin_step(
                    ended, batch.req_ids[:n], batch.num_computed_tokens_cpu[:n],
                    scheduler_output.num_scheduled_tokens, _profile_at(self, batch, n),
                    batch.token_ids_cpu, batch.block_table.block_tables[0].num_blocks_per_row[:n],
                )
        return result

    GPUModelRunner._update_states = _update_states

    original_execute = GPUModelRunner.execute_model

    @functools.wraps(original_execute)
    def execute_model(self: GPUModelRunner, *args, **kwargs):
        result = original_execute(self, *args, **kwargs)
        worker = DEVICE_FASTGEN if DEVICE_FASTGEN.enabled else FASTGEN
        if worker.enabled:  # kivi.fastgen: rows shrink to the kept pages, reports
            batch = self.input_batch
            worker.end_step(batch.block_table.block_tables[0], batch.req_id_to_index)
            attach_reports(result)
        return result

    GPUModelRunner.execute_model = execute_model

    original_sample = GPUModelRunner.sample_tokens

    @functools.wraps(original_sample)
    def sample_tokens(self: GPUModelRunner, *args, **kwargs):
        result = original_sample(self, *args, **kwargs)
        attach_reports(result)
        return result

    GPUModelRunner.sample_tokens = sample_tokens

    original_dummy = GPUModelRunner._dummy_run

    @functools.wraps(original_dummy)
    def _dummy_run(self: GPUModelRunner, *args, **kwargs):
        STEP.in_dummy = True
        try:
            return original_dummy(self, *args, **kwargs)
        finally:
            STEP.in_dummy = False

    GPUModelRunner._dummy_run = _dummy_run
