"""Volume node <-> SimpleITK image, keeping the physical geometry exact.

Slicer stores IJK->RAS; SimpleITK (and relsegcore) use LPS origin, spacing and a direction
matrix. Converting here, in one place, is what keeps the segmentation on top of the CT.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(ValueError):
    """A result image does not lie on the input volume's voxel grid."""


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJK->RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def lps_geometry(volume_node) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) in SimpleITK's LPS convention for a volume node."""
    ijk_to_lps = RAS_TO_LPS @ ijk_to_ras(volume_node)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    return tuple(ijk_to_lps[:3, 3]), tuple(spacing), tuple(direction.flatten())


def check_not_warped(volume_node) -> None:
    """Refuse a volume under a non-linear transform: its voxels are not where its grid says.

    Slicer puts one on a DICOM series with unevenly spaced slices (acquisition geometry regularisation). The
    network and every mL are computed on the voxel grid, so they would be those of the stacked, unwarped slices;
    hardening the transform resamples the CT onto an even grid. A linear transform (a registration) is fine:
    Slicer places the segments through it."""
    transform = volume_node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise ValueError(
            f"Volume {volume_node.GetName()!r} is under the non-linear transform {transform.GetName()!r} (Slicer adds "
            "one to a DICOM series with unevenly spaced slices): volumes in mL would be those of the unwarped "
            "slices. Harden the transform first (Data module: right-click the volume, Harden transform), then segment."
        )


def sitk_image_from_volume(volume_node) -> sitk.Image:
    """A SimpleITK copy of a scalar volume node with the same voxels and physical geometry."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("The input volume has no image data; load a CT first.")
    check_not_warped(volume_node)
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"Volume {volume_node.GetName()!r} is not a scalar (grey-level) volume.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(slicer.util.arrayFromVolume(volume_node)))
    origin, spacing, direction = lps_geometry(volume_node)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def update_volume_from_sitk(volume_node, image: sitk.Image) -> None:
    """Replace a volume node's voxels and geometry by a SimpleITK image's (the inverse conversion)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    ijk_to_ras = RAS_TO_LPS @ ijk_to_lps
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    slicer.util.updateVolumeFromArray(volume_node, sitk.GetArrayFromImage(image))
    volume_node.SetIJKToRASMatrix(matrix)


def array_on_volume_grid(image: sitk.Image, volume_node, tolerance_mm: float = 1e-3) -> np.ndarray:
    """The (k, j, i) array of a result image, after checking it lies on the volume's voxel grid."""
    origin, spacing, direction = lps_geometry(volume_node)
    expected_size = tuple(volume_node.GetImageData().GetDimensions())
    if tuple(image.GetSize()) != expected_size:
        raise GeometryError(f"Result size {image.GetSize()} differs from the input volume's {expected_size}.")
    corners = np.array([[0, 0, 0], [s - 1 for s in expected_size]], dtype=float)
    for index in corners:
        result_point = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        volume_point = np.array(origin) + np.array(direction).reshape(3, 3) @ (index * np.array(spacing))
        if np.abs(result_point - volume_point).max() > tolerance_mm:
            raise GeometryError("The result does not lie on the input volume's voxel grid.")
    return sitk.GetArrayFromImage(image)
