
import triton
import triton.language as tl

from torch._inductor.runtime import triton_helpers, triton_heuristics
from torch._inductor.runtime.triton_helpers import libdevice, math as tl_math
from torch._inductor.runtime.hints import AutotuneHint, ReductionHint, TileHint, DeviceProperties
triton_helpers.set_driver_to_gpu()

@triton_heuristics.persistent_reduction(
    size_hints={'x': 131072, 'r0_': 512},
    reduction_hint=ReductionHint.INNER,
    filename=__file__,
    triton_meta={'signature': {'in_out_ptr0': '*bf16', 'in_out_ptr1': '*bf16', 'in_ptr0': '*bf16', 'in_ptr1': '*fp32', 'in_ptr2': '*bf16', 'in_ptr3': '*bf16', 'in_ptr4': '*bf16', 'in_ptr5': '*fp32', 'in_ptr6': '*bf16', 'in_ptr7': '*fp32', 'in_ptr8': '*bf16', 'in_ptr9': '*fp32', 'in_ptr10': '*bf16', 'in_ptr11': '*fp32', 'in_ptr12': '*fp32', 'in_ptr13': '*fp32', 'in_ptr14': '*bf16', 'out_ptr1': '*bf16', 'ws_ptr': '*fp32', 'xnumel': 'i32', 'r0_numel': 'i32', 'XBLOCK': 'constexpr', 'RSPLIT_SIZE': 'constexpr', 'NUM_STAGES': 'constexpr'}, 'device': DeviceProperties(type='cuda', index=0, multi_processor_count=132, cc=90, major=9, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32), 'constants': {}, 'native_matmul': False, 'enable_fp_fusion': True, 'launch_pdl': False, 'disable_ftz': False, 'configs': [{(0,): [['tt.divisibility', 16]], (1,): [['tt.divisibility', 16]], (2,): [['tt.divisibility', 16]], (3,): [['tt.divisibility', 16]], (4,): [['tt.divisibility', 16]], (5,): [['tt.divisibility', 16]], (6,): [['tt.divisibility', 16]], (7,): [['tt.divisibility', 16]], (8,): [['tt.divisibility', 16]], (9,): [['tt.divisibility', 16]], (10,): [['tt.divisibility', 16]], (11,): [['tt.divisibility', 16]], (12,): [['tt.divisibility', 16]], (13,): [['tt.divisibility', 16]], (14,): [['tt.divisibility', 16]], (15,): [['tt.divisibility', 16]], (16,): [['tt.divisibility', 16]], (17,): [['tt.divisibility', 16]], (18,): [['tt.divisibility', 16]], (19,): [['tt.divisibility', 16]], (20,): [['tt.divisibility', 16]]}]},
    inductor_meta={'grid_type': 'MixOrderReductionGrid', 'autotune_hints': set(), 'kernel_name': 'triton_per_fused__fused_rms_norm__fused_rms_norm_backward__to_copy__unsafe_view_add_mul_select_sum_view_31', 'mutated_arg_names': ['in_out_ptr0', 'in_out_ptr1'], 'optimize_mem': True, 'no_x_dim': None, 'atomic_add_found': False, 'num_load': 18, 'num_store': 2, 'num_reduction': 1, 'backend_hash': '91D1D1166449D9E2EB66EB9770C9E2C3B0FEB787341F27FEB4D3F0338DA50336', 'assert_indirect_indexing': True, 'autotune_local_cache': True, 'autotune_pointwise': True, 'autotune_remote_cache': None, 'force_disable_caches': False, 'dynamic_scale_rblock': True, 'max_autotune': False, 'max_autotune_pointwise': False, 'min_split_scan_rblock': 256, 'spill_threshold': 16, 'store_cubin': False, 'deterministic': False, 'force_filter_reduction_configs': False, 'mix_order_reduction_allow_multi_stages': False, 'are_deterministic_algorithms_enabled': False, 'RSPLIT_SIZE': 64}
)
@triton.jit
def triton_per_fused__fused_rms_norm__fused_rms_norm_backward__to_copy__unsafe_view_add_mul_select_sum_view_31(in_out_ptr0, in_out_ptr1, in_ptr0, in_ptr1, in_ptr2, in_ptr3, in_ptr4, in_ptr5, in_ptr6, in_ptr7, in_ptr8, in_ptr9, in_ptr10, in_ptr11, in_ptr12, in_ptr13, in_ptr14, out_ptr1, ws_ptr, xnumel, r0_numel, XBLOCK : tl.constexpr, RSPLIT_SIZE : tl.constexpr, NUM_STAGES : tl.constexpr):
    xnumel = 98304
    r0_numel = 512
    R0_BLOCK: tl.constexpr = 512
    rnumel = r0_numel
    RBLOCK: tl.constexpr = R0_BLOCK
    xoffset = tl.program_id(0) * RSPLIT_SIZE
    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]
    xmask = tl.full([XBLOCK], True, tl.int1)[:, None]
    r0_index = tl.arange(0, R0_BLOCK)[None, :]
    r0_offset = 0
    r0_mask = tl.full([R0_BLOCK], True, tl.int1)[None, :]
    roffset = r0_offset
    rindex = r0_index
    r0_1 = r0_index
    accum0 = tl.full([R0_BLOCK], 0, tl.float32)[None, :]
    split_size = min(RSPLIT_SIZE, xnumel - xoffset)
    for _ in tl.range(0, split_size, XBLOCK, num_stages=NUM_STAGES):
        x0 = xindex
        xindex += XBLOCK
        tmp0 = tl.load(in_ptr0 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp2 = tl.load(in_ptr1 + (x0), None, eviction_policy='evict_last')
        tmp4 = tl.load(in_out_ptr0 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp5 = tl.load(in_ptr2 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp7 = tl.load(in_ptr3 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp16 = tl.load(in_ptr4 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp24 = tl.load(in_out_ptr1 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp25 = tl.load(in_ptr5 + (512 + r0_1), None, eviction_policy='evict_last')
        tmp28 = tl.load(in_ptr6 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp29 = tl.load(in_ptr7 + (512 + r0_1), None, eviction_policy='evict_last')
        tmp33 = tl.load(in_ptr8 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp34 = tl.load(in_ptr9 + (512 + r0_1), None, eviction_policy='evict_last')
        tmp38 = tl.load(in_ptr10 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp39 = tl.load(in_ptr11 + (512 + r0_1), None, eviction_policy='evict_last')
        tmp43 = tl.load(in_ptr12 + (512 + r0_1), None, eviction_policy='evict_last')
        tmp47 = tl.load(in_ptr12 + (r0_1), None, eviction_policy='evict_last')
        tmp50 = tl.load(in_ptr13 + (r0_1), None, eviction_policy='evict_last')
        tmp53 = tl.load(in_ptr14 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp1 = tmp0.to(tl.float32)
        tmp3 = tmp1 * tmp2
        tmp6 = tmp4 + tmp5
        tmp8 = tmp6 + tmp7
        tmp9 = tl.full([1, 1], 0.3779644730092272, tl.float32)
        tmp10 = tmp8 * tmp9
        tmp11 = tmp10.to(tl.float32)
        tmp12 = tmp3 * tmp11
        tmp13 = tl.broadcast_to(tmp12, [XBLOCK, R0_BLOCK])
        tmp15 = tl.sum(tmp13, 1)[:, None].to(tl.float32)
        tmp17 = tl.full([1, 1], 0.001953125, tl.float32)
        tmp18 = tmp3 * tmp17
        tmp19 = tmp18 * tmp15
        tmp20 = tmp11 - tmp19
        tmp21 = tmp20 * tmp2
        tmp22 = tmp21.to(tl.float32)
        tmp23 = tmp16 + tmp22
        tmp26 = tmp25.to(tl.float32)
        tmp27 = tmp24 * tmp26
        tmp30 = tmp29.to(tl.float32)
        tmp31 = tmp28 * tmp30
        tmp32 = tmp27 + tmp31
        tmp35 = tmp34.to(tl.float32)
        tmp36 = tmp33 * tmp35
        tmp37 = tmp32 + tmp36
        tmp40 = tmp39.to(tl.float32)
        tmp41 = tmp38 * tmp40
        tmp42 = tmp37 + tmp41
        tmp44 = tmp43.to(tl.float32)
        tmp45 = tmp23 * tmp44
        tmp46 = tmp42 + tmp45
        tmp48 = tmp47.to(tl.float32)
        tmp49 = tmp23 * tmp48
        tmp51 = tmp50.to(tl.float32)
        tmp52 = tmp49 * tmp51
        tmp54 = tmp16 * tmp53
        tmp55 = tmp54.to(tl.float32)
        tl.store(in_out_ptr0 + (r0_1 + 512*x0), tmp23, None)
        tl.store(in_out_ptr1 + (r0_1 + 512*x0), tmp46, None)
        tl.store(out_ptr1 + (r0_1 + 512*x0), tmp52, None)
        tmp56 = tl.sum(tmp55, 0)
        tmp57 = accum0 + tmp56
        accum0 = tmp57
    tl.store(ws_ptr + (tl.program_id(0) + 0 * tl.num_programs(0)) * r0_numel + r0_index, accum0, r0_mask)
