//! Table-driven tests of [`check`]: every pair of the five tensors, moved onto each other in every
//! form of overlap (identical, shifted, inside, around, one byte) and of non-overlap (adjacent,
//! zero-length), in both directions; the two allowed forms alone and together; chains; ranges at
//! the end of the address space.

use super::*;

const NAMES: [&str; 5] = ["input", "residual", "weight", "out", "residual_out"];

/// Disjoint tensors, 64 KiB apart: moving one next to another overlaps only that one.
fn base() -> [Span; 5] {
    [
        Span { start: 0x1_0000, len: 1024 },
        Span { start: 0x2_0000, len: 1024 },
        Span { start: 0x3_0000, len: 256 },
        Span { start: 0x4_0000, len: 1024 },
        Span { start: 0x5_0000, len: 1024 },
    ]
}

fn spans(s: [Span; 5]) -> Spans {
    Spans { input: s[0], residual: s[1], weight: s[2], out: s[3], residual_out: s[4] }
}

fn allowed(x: usize, y: usize) -> bool {
    let pair = (x.min(y), x.max(y));
    pair == (0, 3) || pair == (1, 4)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Ok,
    Refused { identical: bool },
}

/// Each form: where tensor `x` goes, given `x`'s own span and `y`'s; what check must say
/// (`None`: refused as identical unless the pair is allowed).
type Form = (&'static str, fn(Span, Span) -> Span, Option<Want>);

const FORMS: [Form; 10] = [
    ("identical", |_, y| y, None),
    ("shifted by 16", |_, y| Span { start: y.start + 16, len: y.len }, Some(Want::Refused { identical: false })),
    ("shifted back by 16", |_, y| Span { start: y.start - 16, len: y.len }, Some(Want::Refused { identical: false })),
    ("inside", |_, y| Span { start: y.start + 16, len: 16 }, Some(Want::Refused { identical: false })),
    ("same start, shorter", |_, y| Span { start: y.start, len: y.len - 16 }, Some(Want::Refused { identical: false })),
    ("around", |_, y| Span { start: y.start - 16, len: y.len + 32 }, Some(Want::Refused { identical: false })),
    ("last byte", |x, y| Span { start: y.start + y.len - 1, len: x.len }, Some(Want::Refused { identical: false })),
    ("adjacent before", |x, y| Span { start: y.start - x.len, len: x.len }, Some(Want::Ok)),
    ("adjacent after", |x, y| Span { start: y.start + y.len, len: x.len }, Some(Want::Ok)),
    ("zero-length at its start", |_, y| Span { start: y.start, len: 0 }, Some(Want::Ok)),
];

fn got(result: Result<()>) -> (Want, Option<(&'static str, &'static str)>) {
    match result {
        Ok(()) => (Want::Ok, None),
        Err(Error::Aliasing { a, b, identical }) => (Want::Refused { identical }, Some((a, b))),
        Err(other) => panic!("expected Aliasing, got {other:?}"),
    }
}

#[test]
fn disjoint_tensors_pass() {
    assert!(check(&spans(base())).is_ok());
}

#[test]
fn every_pair_in_every_form_and_both_directions() {
    let mut cases = 0;
    for x in 0..5 {
        for y in 0..5 {
            if x == y {
                continue;
            }
            for (form, place, want) in FORMS {
                let mut s = base();
                s[x] = place(s[x], s[y]);
                let want = want.unwrap_or(if allowed(x, y) { Want::Ok } else { Want::Refused { identical: true } });
                let (seen, pair) = got(check(&spans(s)));
                let what = format!("{} moved onto {} ({form})", NAMES[x], NAMES[y]);
                assert_eq!(seen, want, "{what}");
                if seen != Want::Ok {
                    assert_eq!(pair, Some((NAMES[x.min(y)], NAMES[x.max(y)])), "{what}: the pair, in order");
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 20 * FORMS.len());
}

#[test]
fn the_two_allowed_forms_together() {
    let mut s = base();
    s[3] = s[0]; // out == input
    s[4] = s[1]; // residual_out == residual
    assert!(check(&spans(s)).is_ok());
}

#[test]
fn a_chain_through_an_allowed_pair_is_refused_at_its_first_other_pair() {
    // out == input == residual_out: (input, out) is allowed, (input, residual_out) is not.
    let mut s = base();
    s[3] = s[0];
    s[4] = s[0];
    assert!(matches!(check(&spans(s)), Err(Error::Aliasing { a: "input", b: "residual_out", identical: true })));
    // residual == residual_out == out: (residual, out) comes first.
    let mut s = base();
    s[4] = s[1];
    s[3] = s[1];
    assert!(matches!(check(&spans(s)), Err(Error::Aliasing { a: "residual", b: "out", identical: true })));
}

#[test]
fn zero_length_tensors_overlap_nothing() {
    // An empty call: every tensor empty at one address.
    let empty = Span { start: 0x1_0000, len: 0 };
    assert!(check(&Spans { input: empty, residual: empty, weight: empty, out: empty, residual_out: empty }).is_ok());
    // An empty tensor inside a live one.
    let mut s = base();
    s[2] = Span { start: s[0].start + 512, len: 0 };
    assert!(check(&spans(s)).is_ok());
}

#[test]
fn ranges_at_the_end_of_the_address_space_are_compared_without_wrapping() {
    let mut s = base();
    s[0] = Span { start: u64::MAX - 8, len: 16 }; // runs past the end
    s[1] = Span { start: u64::MAX - 4, len: 4 };
    assert!(matches!(check(&spans(s)), Err(Error::Aliasing { a: "input", b: "residual", identical: false })));
    // Wrapping would have put input's end at 7, below everything else: it must not overlap 0..16.
    let mut s = base();
    s[0] = Span { start: u64::MAX - 8, len: 16 };
    s[1] = Span { start: 0, len: 16 };
    assert!(check(&spans(s)).is_ok());
    // A length that does not fit in u64 saturates and so overlaps what follows it.
    assert_eq!(Span::elems(0x100, usize::MAX, 2), Span { start: 0x100, len: u64::MAX });
    assert_eq!(Span::elems(0x100, 512, 2), Span { start: 0x100, len: 1024 });
    let mut s = base();
    s[0] = Span::elems(0x100, usize::MAX, 2);
    assert!(matches!(check(&spans(s)), Err(Error::Aliasing { a: "input", b: "residual", identical: false })));
}

#[test]
fn the_message_names_the_pair_and_the_allowed_forms() {
    let mut s = base();
    s[3] = s[4]; // out == residual_out: the case that silently lost residual_out
    let err = check(&spans(s)).expect_err("out == residual_out");
    let text = err.to_string();
    for part in
        ["out and residual_out are the same memory", "residual_out == residual", "out == input", "identical range"]
    {
        assert!(text.contains(part), "{part:?} missing from {text:?}");
    }
    let mut s = base();
    s[3] = Span { start: s[0].start + 16, len: s[0].len };
    assert!(check(&spans(s)).expect_err("partial").to_string().starts_with("input and out partly overlap"));
}
