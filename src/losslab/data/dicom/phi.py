"""De-identification of DICOM metadata: the PS3.15 identifiers no reader returns, and the technical
fields :func:`safe_metadata` keeps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom

#: PS3.15 Annex E basic application level confidentiality profile: the attribute keywords that
#: identify a patient, a visit or staff (plus UIDs, which link records). None is ever returned.
PHI_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
        "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
        "PatientMotherBirthName", "PatientBirthName", "PatientComments", "PatientInsurancePlanCodeSequence",
        "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
        "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "EthnicGroup", "Occupation",
        "AdditionalPatientHistory", "CountryOfResidence", "RegionOfResidence", "PregnancyStatus",
        "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
        "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime", "AcquisitionDateTime",
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
        "PhysiciansOfRecord", "RequestingPhysician", "ScheduledPerformingPhysicianName",
        "StationName", "DeviceSerialNumber", "StudyDescription", "SeriesDescription",
        "ImageComments", "RequestAttributesSequence", "RequestedProcedureID",
        "PerformedProcedureStepID", "PerformedProcedureStepDescription",
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
        "MediaStorageSOPInstanceUID", "ReferencedSOPInstanceUID", "InstanceCreatorUID",
        "IrradiationEventUID", "StorageMediaFileSetUID", "SynchronizationFrameOfReferenceUID",
        "PatientState", "ResponsiblePerson", "ResponsibleOrganization", "ProtocolName",
        "DerivationDescription", "ContentCreatorName", "VerifyingObserverName",
    }
)

#: Technical fields :func:`safe_metadata` may return (whitelist: anything else is dropped).
SAFE_KEYWORDS: tuple[str, ...] = (
    "Modality", "Rows", "Columns", "NumberOfFrames", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "ImageOrientationPatient", "PhotometricInterpretation",
    "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "MagneticFieldStrength",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "ScanningSequence",
    "SequenceVariant", "MRAcquisitionType", "KVP", "ConvolutionKernel", "BodyPartExamined",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    try:
        return float(value)  # DS / IS
    except (TypeError, ValueError):
        return str(value)


def safe_metadata(ds: Any) -> dict[str, Any]:
    """The whitelisted technical fields of a dataset as a JSON-able dict (never an identifier).

    >>> safe_metadata(pydicom.Dataset())
    {}
    """
    out: dict[str, Any] = {}
    for keyword in SAFE_KEYWORDS:
        if keyword in PHI_KEYWORDS:  # pragma: no cover - defensive: the lists must stay disjoint
            continue
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[keyword] = _jsonable(value)
    return out
