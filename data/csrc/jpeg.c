/* libjpeg-turbo decoding for ferroclip_data::jpeg: the header, and a rectangle of the image at
 * a DCT scale of M/8, decoding only the rows and columns the rectangle needs
 * (jpeg_crop_scanline, jpeg_skip_scanlines, and no rows below it).
 *
 * libjpeg reports fatal errors by calling error_exit, which must not return: we longjmp back
 * here, in C, so no Rust frame is ever unwound by longjmp. */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct fc_error {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void fc_error_exit(j_common_ptr cinfo) {
    struct fc_error *err = (struct fc_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* Warnings are ignored as Pillow ignores them, except a premature end of data: Pillow raises
 * "image file is truncated" there. */
static void fc_emit_message(j_common_ptr cinfo, int level) {
    struct fc_error *err = (struct fc_error *)cinfo->err;
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        (*cinfo->err->format_message)(cinfo, err->message);
        longjmp(err->jump, 1);
    }
}

struct fc_jpeg_header {
    uint32_t width, height;
    /* 1: RGB output; 4: CMYK output (the caller converts as Pillow does). */
    uint32_t components;
    /* An Adobe APP14 marker was seen (Pillow then reads CMYK inverted). */
    uint32_t adobe;
};

/* The frame size and how pixels come out. 0 on success, else -1 with `message` set. */
int fc_jpeg_header(const uint8_t *data, size_t len, struct fc_jpeg_header *out, char *message, size_t cap) {
    struct jpeg_decompress_struct cinfo;
    struct fc_error err;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = fc_error_exit;
    err.mgr.emit_message = fc_emit_message;
    if (setjmp(err.jump)) {
        snprintf(message, cap, "%s", err.message);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    out->width = cinfo.image_width;
    out->height = cinfo.image_height;
    out->components = (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) ? 4 : 3;
    out->adobe = cinfo.saw_Adobe_marker ? 1 : 0;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

struct fc_jpeg_region {
    /* In: the wanted rectangle, in the coordinates of the image scaled by scale_num/8.
     * Out: the rectangle actually decoded (left widened to an iMCU boundary, width to match). */
    uint32_t left, top, width, height;
    /* Out: the scaled image's full size. */
    uint32_t scaled_width, scaled_height;
};

/* Decode `region` of the image at scale `scale_num`/8 (1..=8) into `out` (capacity `cap` bytes),
 * rows packed, `components` bytes per pixel. The widened region must fit: the caller sizes
 * `out` for (width + 2 iMCU widths) × height × 4. 0 on success, else -1 with `message` set. */
int fc_jpeg_decode(const uint8_t *data, size_t len, uint32_t scale_num, struct fc_jpeg_region *region,
                   uint8_t *out, size_t cap, char *message, size_t cap_message) {
    struct jpeg_decompress_struct cinfo;
    struct fc_error err;
    JSAMPROW row;
    JDIMENSION left, width, top, bottom, y;
    size_t stride;
    int cmyk;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = fc_error_exit;
    err.mgr.emit_message = fc_emit_message;
    if (setjmp(err.jump)) {
        snprintf(message, cap_message, "%s", err.message);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
    /* Pillow's defaults: RGB (or CMYK) out, islow IDCT, fancy upsampling. */
    cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.scale_num = scale_num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    region->scaled_width = cinfo.output_width;
    region->scaled_height = cinfo.output_height;
    if (region->left >= cinfo.output_width || region->top >= cinfo.output_height || region->width == 0 ||
        region->height == 0) {
        snprintf(message, cap_message, "decode region %ux%u+%u+%u outside the %ux%u image", region->width,
                 region->height, region->left, region->top, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (region->left + region->width > cinfo.output_width) region->width = cinfo.output_width - region->left;
    if (region->top + region->height > cinfo.output_height) region->height = cinfo.output_height - region->top;
    left = region->left;
    width = region->width;
    if (left > 0 || width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &left, &width);
    stride = (size_t)width * (size_t)cinfo.output_components;
    if (stride * region->height > cap) {
        snprintf(message, cap_message, "decode buffer too small for %ux%u", width, region->height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    top = region->top;
    bottom = top + region->height;
    if (top > 0 && jpeg_skip_scanlines(&cinfo, top) != top) {
        snprintf(message, cap_message, "could not skip to row %u", top);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    for (y = top; y < bottom;) {
        row = out + (size_t)(y - top) * stride;
        if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
            snprintf(message, cap_message, "no scanline %u", y);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        y++;
    }
    region->left = left;
    region->width = width;
    /* The rows below the region are never decoded. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
