"""The Camtrap DP 1.0 table constraints as the project's own data, so import and export need no files.

Field names and order, types, required/unique, ranges, enums, patterns, primary and foreign keys are
facts of the standard (tdwg/camtrap-dp 1.0.2); ``table_schema`` turns a table into a Frictionless Table
Schema for validation. A test cross-checks this encoding against the official schema files when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

VERSION = "1.0.2"
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
MISSING_VALUES = ("", "NA", "NaN", "nan")
FILE_PATH_PATTERN = r"^(?=^[^./~])(^((?!\.{2}).)*$).*$"
"""A relative path: no leading '/', '.' or '~' and no '..' anywhere."""
MEDIATYPE_PATTERN = r"^(image|video|audio)/.*$"

FieldType = Literal["string", "number", "integer", "boolean", "datetime", "any"]


@dataclass(frozen=True)
class Field:
    """One column: its type and the constraints the standard puts on it."""

    name: str
    type: FieldType = "string"
    required: bool = False
    unique: bool = False
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[str, ...] = ()
    pattern: str | None = None

    def descriptor(self) -> dict[str, Any]:
        """The Frictionless field descriptor."""
        constraints: dict[str, Any] = {"required": self.required}
        if self.unique:
            constraints["unique"] = True
        if self.minimum is not None:
            constraints["minimum"] = self.minimum
        if self.maximum is not None:
            constraints["maximum"] = self.maximum
        if self.enum:
            constraints["enum"] = list(self.enum)
        if self.pattern is not None:
            constraints["pattern"] = self.pattern
        field: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == "datetime":
            field["format"] = DATETIME_FORMAT
        field["constraints"] = constraints
        return field


@dataclass(frozen=True)
class Table:
    """One table of a package: its fields in the standard's order, primary key and references."""

    name: str
    fields: tuple[Field, ...]
    primary_key: str
    references: tuple[str, ...] = ()
    """Tables whose primary key (a column of the same name here) this table refers to."""

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names in the standard's order, as written in the CSV header."""
        return tuple(f.name for f in self.fields)

    def table_schema(self) -> dict[str, Any]:
        """The Frictionless Table Schema that checks this table."""
        schema: dict[str, Any] = {
            "name": self.name,
            "fields": [f.descriptor() for f in self.fields],
            "missingValues": list(MISSING_VALUES),
            "primaryKey": self.primary_key,
        }
        if self.references:
            schema["foreignKeys"] = [
                {"fields": key, "reference": {"resource": table, "fields": key}}
                for table, key in ((t, TABLES[t].primary_key) for t in self.references)
            ]
        return schema


def _id(name: str) -> Field:
    return Field(name, required=True, unique=True)


def _when(name: str, *, required: bool = True) -> Field:
    return Field(name, "datetime", required=required)


def _share(name: str, *, minimum: float = 0.0) -> Field:
    """A fraction of the frame, 0-1."""
    return Field(name, "number", minimum=minimum, maximum=1)


DEPLOYMENTS = Table(
    "deployments",
    (
        _id("deploymentID"),
        Field("locationID"),
        Field("locationName"),
        Field("latitude", "number", required=True, minimum=-90, maximum=90),
        Field("longitude", "number", required=True, minimum=-180, maximum=180),
        Field("coordinateUncertainty", "integer", minimum=1),
        _when("deploymentStart"),
        _when("deploymentEnd"),
        Field("setupBy"),
        Field("cameraID"),
        Field("cameraModel"),
        Field("cameraDelay", "integer", minimum=0),
        Field("cameraHeight", "number", minimum=0),
        Field("cameraDepth", "number", minimum=0),
        Field("cameraTilt", "integer", minimum=-90, maximum=90),
        Field("cameraHeading", "integer", minimum=0, maximum=360),
        Field("detectionDistance", "number", minimum=0),
        Field("timestampIssues", "boolean"),
        Field("baitUse", "boolean"),
        Field(
            "featureType",
            enum=(
                "roadPaved",
                "roadDirt",
                "trailHiking",
                "trailGame",
                "roadUnderpass",
                "roadOverpass",
                "roadBridge",
                "culvert",
                "burrow",
                "nestSite",
                "carcass",
                "waterSource",
                "fruitingTree",
            ),
        ),
        Field("habitat"),
        Field("deploymentGroups"),
        Field("deploymentTags"),
        Field("deploymentComments"),
    ),
    primary_key="deploymentID",
)

MEDIA = Table(
    "media",
    (
        _id("mediaID"),
        Field("deploymentID", required=True),
        Field("captureMethod", enum=("activityDetection", "timeLapse")),
        _when("timestamp"),
        Field("filePath", required=True, pattern=FILE_PATH_PATTERN),
        Field("filePublic", "boolean", required=True),
        Field("fileName"),
        Field("fileMediatype", required=True, pattern=MEDIATYPE_PATTERN),
        Field("exifData", "any"),
        Field("favorite", "boolean"),
        Field("mediaComments"),
    ),
    primary_key="mediaID",
    references=("deployments",),
)

OBSERVATIONS = Table(
    "observations",
    (
        _id("observationID"),
        Field("deploymentID", required=True),
        Field("mediaID"),
        Field("eventID"),
        _when("eventStart"),
        _when("eventEnd"),
        Field("observationLevel", required=True, enum=("media", "event")),
        Field(
            "observationType",
            required=True,
            enum=("animal", "human", "vehicle", "blank", "unknown", "unclassified"),
        ),
        Field("cameraSetupType", enum=("setup", "calibration")),
        Field("scientificName"),
        Field("count", "integer", minimum=1),
        Field("lifeStage", enum=("adult", "subadult", "juvenile")),
        Field("sex", enum=("female", "male")),
        Field("behavior"),
        Field("individualID"),
        Field("individualPositionRadius", "number", minimum=0),
        Field("individualPositionAngle", "number", minimum=-90, maximum=90),
        Field("individualSpeed", "number", minimum=0),
        _share("bboxX"),
        _share("bboxY"),
        _share("bboxWidth", minimum=1e-15),  # a box has a size: strictly positive
        _share("bboxHeight", minimum=1e-15),
        Field("classificationMethod", enum=("human", "machine")),
        Field("classifiedBy"),
        _when("classificationTimestamp", required=False),
        Field("classificationProbability", "number", minimum=0, maximum=1),
        Field("observationTags"),
        Field("observationComments"),
    ),
    primary_key="observationID",
    references=("deployments", "media"),
)

TABLES: dict[str, Table] = {t.name: t for t in (DEPLOYMENTS, MEDIA, OBSERVATIONS)}
"""The three tables of a package, in the order they are written and checked."""
