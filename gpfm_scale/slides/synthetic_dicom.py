"""Write a small DICOM whole-slide image (VL Whole Slide Microscopy Image IOD) from an RGB array, for tests and demos.

Why here and not through a converter: wsidicom writes DICOM only from an opened source (wsidicomizer adds the
sources, but pins an older wsidicom), so the fixture builds the IOD with pydicom, the way NCI's Imaging Data
Commons serves TCGA: one file per pyramid level, all in one series, TILED_FULL frames (row-major, edge frames
padded), pixel spacing in mm in the shared functional groups. Frames are uncompressed RGB (exact pixels, for
tests that compare them) or baseline JPEG (YBR_FULL_422, as IDC's converted slides are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)


@dataclass(frozen=True)
class DicomSlideInfo:
    """What `write_dicom_wsi` wrote: the folder, one file per level, each level's (width, height) and pixels."""

    folder: str
    files: tuple[str, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    levels: tuple[np.ndarray, ...]
    mpp: float


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _frames(pixels: np.ndarray, tile: int) -> list[np.ndarray]:
    """TILED_FULL frames of `pixels` [H, W, 3], row by row, edge frames padded white to tile x tile."""
    h, w = pixels.shape[:2]
    frames = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = pixels[y:y + tile, x:x + tile]
            frame[: part.shape[0], : part.shape[1]] = part
            frames.append(frame)
    return frames


def _level_dataset(pixels: np.ndarray, level: int, mpp: float, tile: int, jpeg: bool, quality: int,
                   uids: dict[str, str]) -> Dataset:
    h, w = pixels.shape[:2]
    spacing_mm = mpp * 2**level / 1000.0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.DimensionOrganizationUID = uids["frame"], uids["dimension"]
    ds.Modality, ds.Manufacturer, ds.InstanceNumber, ds.SeriesNumber = "SM", "gpfm-scale", level + 1, 1
    ds.PatientID, ds.PatientName, ds.StudyID, ds.AccessionNumber = "SYNTH", "Synthetic^Slide", "1", ""
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20240101", "000000", "20240101", "000000"
    ds.ContainerIdentifier, ds.SpecimenLabelInImage = "SYNTH", "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    if level == 0:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    else:
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
    ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * spacing_mm, h * spacing_mm, 0.001
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01" if jpeg else "00"
    ds.SharedFunctionalGroupsSequence = _shared_groups(spacing_mm, list(ds.ImageType))
    ds.OpticalPathSequence = _optical_paths(mpp)
    _add_frames(ds, pixels, tile, jpeg, quality)
    return ds


def _shared_groups(spacing_mm: float, image_type: list[str]) -> Sequence:
    """Pixel spacing (mm, row then column), frame type and optical path, the same for every frame."""
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]  # (row spacing = y, column spacing = x), mm
    measures.SliceThickness, measures.SpacingBetweenSlices = 0.001, 0.001
    frame_type = Dataset()
    frame_type.FrameType = image_type
    path_id = Dataset()
    path_id.OpticalPathIdentifier = "0"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    shared.OpticalPathIdentificationSequence = Sequence([path_id])
    return Sequence([shared])


def _optical_paths(mpp: float) -> Sequence:
    """One brightfield optical path; objective power by the usual 10 / mpp convention."""
    optical = Dataset()
    optical.OpticalPathIdentifier = "0"
    optical.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    optical.IlluminationColorCodeSequence = Sequence([_code("11744", "DCM", "Full Spectrum")])
    optical.ObjectiveLensPower = round(10.0 / mpp, 3)
    return Sequence([optical])


def _add_frames(ds: Dataset, pixels: np.ndarray, tile: int, jpeg: bool, quality: int) -> None:
    """Pixel Data: raw RGB frames back to back, or one encapsulated baseline JPEG per frame."""
    frames = _frames(pixels, tile)
    ds.NumberOfFrames = len(frames)
    if jpeg:
        encoded = [simplejpeg.encode_jpeg(f, quality=quality, colorspace="RGB", colorsubsampling="420")
                   for f in frames]
        ds.PixelData = encapsulate(encoded)
    else:
        ds.PixelData = b"".join(f.tobytes() for f in frames)
    ds["PixelData"].VR = "OB"


def write_dicom_wsi(folder: str | os.PathLike[str], rgb: np.ndarray, mpp: float = 0.25, tile: int = 256,
                    levels: int = 3, jpeg: bool = False, quality: int = 95) -> DicomSlideInfo:
    """Write `rgb` (uint8 [H, W, 3], level 0 at `mpp` µm/px) as a DICOM WSI series into `folder`, one
    `level-{k}.dcm` per level; level k is level 0 area-downsampled by 2**k (size floor(W / 2**k))."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    os.makedirs(folder, exist_ok=True)
    uids = {k: generate_uid() for k in ("study", "series", "frame", "dimension")}
    files, dims, pixels_by_level = [], [], []
    h, w = rgb.shape[:2]
    for level in range(levels):
        lw, lh = w // 2**level, h // 2**level
        if min(lw, lh) < 1:
            break
        pixels = rgb if level == 0 else cv2.resize(rgb, (lw, lh), interpolation=cv2.INTER_AREA)
        ds = _level_dataset(pixels, level, mpp, tile, jpeg, quality, uids)
        path = os.path.join(os.fspath(folder), f"level-{level}.dcm")
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        dims.append((lw, lh))
        pixels_by_level.append(pixels)
    return DicomSlideInfo(os.fspath(folder), tuple(files), tuple(dims), tuple(pixels_by_level), mpp)
