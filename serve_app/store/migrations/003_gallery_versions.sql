-- A version counter per site, bumped by every change of a gallery (an assignment, a merge, a new or
-- removed profile). Serve replicas poll it (one cheap query) and reload a site's gallery only when it moved.

-- Versions come from one global sequence, so they never repeat even if the table is emptied.
CREATE SEQUENCE gallery_version_seq;

CREATE TABLE gallery_versions (
    site_id     bigint PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE,
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION bump_gallery_version(p_site_id bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO gallery_versions (site_id, version) VALUES (p_site_id, nextval('gallery_version_seq'))
    ON CONFLICT (site_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now();
$$;

CREATE FUNCTION detections_gallery_bump() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_image bigint;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.deer_id IS NOT DISTINCT FROM NEW.deer_id THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.deer_id IS NOT NULL THEN
        PERFORM bump_gallery_version(c.site_id) FROM images i JOIN cameras c ON c.id = i.camera_id
        WHERE i.id = NEW.image_id;
    ELSIF TG_OP <> 'INSERT' AND OLD.deer_id IS NOT NULL THEN
        v_image := OLD.image_id;
        PERFORM bump_gallery_version(c.site_id) FROM images i JOIN cameras c ON c.id = i.camera_id
        WHERE i.id = v_image;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER detections_gallery_bump
AFTER INSERT OR UPDATE OF deer_id OR DELETE ON detections
FOR EACH ROW EXECUTE FUNCTION detections_gallery_bump();

CREATE FUNCTION deer_gallery_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM bump_gallery_version(OLD.site_id);
    ELSE
        PERFORM bump_gallery_version(NEW.site_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER deer_gallery_bump
AFTER INSERT OR UPDATE OF merged_into, name OR DELETE ON deer
FOR EACH ROW EXECUTE FUNCTION deer_gallery_bump();
