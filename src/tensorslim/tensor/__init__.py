"""Pure tensor math on torch tensors (never imports torch.nn).

Algebra: :func:`unfold`, :func:`fold`, :func:`mode_dot`, :func:`multi_mode_dot`, :func:`kron`,
:func:`khatri_rao`, :func:`hadamard`, :func:`rel_error`.
Decompositions (pure functions returning the small frozen result types):
:func:`svd` -> :class:`SVDResult`, :func:`cp_als` -> :class:`CPTensor`,
:func:`tucker` -> :class:`TuckerTensor`, :func:`tt_svd` -> :class:`TTTensor`,
:func:`tt_matrix` -> :class:`TTMatrix`, :func:`cp_epc` -> :class:`CPTensor` (CP of least
:func:`sensitivity` within an error bound; :func:`component_intensities`).
"""
from .cp import cp_als
from .cp_epc import component_intensities, cp_epc, sensitivity
from .filter_cp import FilterCP, coupled_filter_cp, filter_cp, filter_distances, principal_angles
from .maxvol import maxvol, rect_maxvol
from .ops import fold, hadamard, khatri_rao, kron, mode_dot, multi_mode_dot, rel_error, unfold
from .results import CPTensor, SVDResult, TTMatrix, TTTensor, TuckerTensor
from .svd import svd
from .tt import tt_matrix, tt_svd
from .tucker import tucker
from .whiten import WhitenedSVD, asvd, output_error_curve, reduced_rank_regression, row_weighted_svd, whitened_svd, whitening_factor

__all__ = [
    "CPTensor",
    "SVDResult",
    "TTMatrix",
    "TTTensor",
    "TuckerTensor",
    "component_intensities",
    "cp_als",
    "cp_epc",
    "fold",
    "FilterCP", "coupled_filter_cp", "filter_cp", "filter_distances", "principal_angles",
    "hadamard",
    "khatri_rao",
    "kron",
    "maxvol",
    "rect_maxvol",
    "mode_dot",
    "multi_mode_dot",
    "rel_error",
    "sensitivity",
    "svd",
    "tt_matrix",
    "tt_svd",
    "tucker",
    "unfold",
    "WhitenedSVD", "asvd", "output_error_curve", "reduced_rank_regression", "row_weighted_svd", "whitened_svd", "whitening_factor",
]
