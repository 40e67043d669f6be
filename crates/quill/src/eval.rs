//! Task scores. Translation, as sacreBLEU defines them (its defaults, so numbers compare with
//! published ones): corpus BLEU with the `13a` tokenizer, 4-grams, exponential smoothing and
//! the brevity penalty; and chrF (character 6-grams, β = 2, whitespace removed). Answers, as
//! SQuAD's evaluation defines them: exact match and token F1 after normalisation. One
//! reference per hypothesis.

use std::collections::HashMap;

/// sacreBLEU's `13a` tokenizer (mteval-v13a): HTML entities undone, then punctuation and
/// symbols split from words (periods and commas only where not between digits, dashes
/// after a digit), spaces collapsed.
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {s} ").chars().collect();
    // symbols: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    let symbol =
        |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let mut a = Vec::with_capacity(chars.len() * 2);
    for c in chars {
        if symbol(c) {
            a.extend([' ', c, ' ']);
        } else {
            a.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    // each rule replaces its leftmost matches in turn, a match never overlapping the last
    let rule =
        |s: &[char], m: &dyn Fn(char, char) -> bool, out: &dyn Fn(char, char) -> [char; 4]| {
            let mut o = Vec::with_capacity(s.len() + 16);
            let mut i = 0;
            while i < s.len() {
                if i + 1 < s.len() && m(s[i], s[i + 1]) {
                    o.extend(out(s[i], s[i + 1]).iter().filter(|&&c| c != '\0'));
                    i += 2;
                } else {
                    o.push(s[i]);
                    i += 1;
                }
            }
            o
        };
    // a period or comma after a non-digit: "x ." + " "
    let b = rule(&a, &|x, y| !digit(x) && period_comma(y), &|x, y| {
        [x, ' ', y, ' ']
    });
    // a period or comma before a non-digit: " " + ". x"
    let c = rule(&b, &|x, y| period_comma(x) && !digit(y), &|x, y| {
        [' ', x, ' ', y]
    });
    // a dash after a digit: "9 - "
    let d = rule(&c, &|x, y| digit(x) && y == '-', &|x, y| [x, ' ', y, ' ']);
    d.into_iter()
        .collect::<String>()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Corpus BLEU and its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Bleu {
    /// 0 to 100.
    pub score: f64,
    /// n-gram precisions (percent, smoothed), n = 1..4.
    pub precisions: [f64; 4],
    pub brevity_penalty: f64,
    pub hyp_len: usize,
    pub ref_len: usize,
}

fn ngram_counts<T: std::hash::Hash + Eq + Clone>(items: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut m = HashMap::new();
    if items.len() >= n {
        for w in items.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// Matches (the clipped count of shared n-grams) of one order.
fn matches<T: std::hash::Hash + Eq + Clone>(h: &[T], r: &[T], n: usize) -> usize {
    let rc = ngram_counts(r, n);
    ngram_counts(h, n)
        .into_iter()
        .map(|(g, c)| c.min(rc.get(g).copied().unwrap_or(0)))
        .sum()
}

/// Corpus BLEU of `hyps` against `refs` (same length).
pub fn corpus_bleu(hyps: &[String], refs: &[String]) -> Bleu {
    assert_eq!(hyps.len(), refs.len());
    let (mut correct, mut total) = ([0usize; 4], [0usize; 4]);
    let (mut hyp_len, mut ref_len) = (0, 0);
    for (h, r) in hyps.iter().zip(refs) {
        let (h, r) = (tokenize_13a(h), tokenize_13a(r));
        hyp_len += h.len();
        ref_len += r.len();
        for n in 1..=4 {
            correct[n - 1] += matches(&h, &r, n);
            total[n - 1] += (h.len() + 1).saturating_sub(n);
        }
    }
    let bp = if hyp_len >= ref_len {
        1.0
    } else if hyp_len > 0 {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    } else {
        0.0
    };
    let mut precisions = [0.0f64; 4];
    if correct.iter().all(|&c| c == 0) {
        return Bleu {
            score: 0.0,
            precisions,
            brevity_penalty: bp,
            hyp_len,
            ref_len,
        };
    }
    // exponential smoothing: the k-th order with no match counts as 1 / 2^k matches
    let mut halvings = 1.0;
    for n in 0..4 {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            halvings *= 2.0;
            100.0 / (halvings * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    // a precision of 0 (an order the hypotheses are too short for) zeroes the score
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let mean = precisions.iter().map(|&p| log(p)).sum::<f64>() / 4.0;
    Bleu {
        score: bp * mean.exp(),
        precisions,
        brevity_penalty: bp,
        hyp_len,
        ref_len,
    }
}

/// Corpus chrF (β = 2, character n-grams of 1 to 6, whitespace removed): the F-score of the
/// precision and recall averaged over the orders both sides have n-grams of, from counts
/// summed over the corpus; 0 to 100.
pub fn corpus_chrf(hyps: &[String], refs: &[String]) -> f64 {
    assert_eq!(hyps.len(), refs.len());
    const ORDER: usize = 6;
    let mut stats = [[0usize; 3]; ORDER];
    for (h, r) in hyps.iter().zip(refs) {
        let h: Vec<char> = h.chars().filter(|c| !is_space(*c)).collect();
        let r: Vec<char> = r.chars().filter(|c| !is_space(*c)).collect();
        for n in 1..=ORDER {
            stats[n - 1][0] += (h.len() + 1).saturating_sub(n);
            stats[n - 1][1] += (r.len() + 1).saturating_sub(n);
            stats[n - 1][2] += matches(&h, &r, n);
        }
    }
    let beta2 = 4.0;
    let (mut prec, mut rec, mut orders) = (0.0, 0.0, 0);
    for [nh, nr, nm] in stats {
        if nh > 0 && nr > 0 {
            prec += nm as f64 / nh as f64;
            rec += nm as f64 / nr as f64;
            orders += 1;
        }
    }
    if orders == 0 {
        return 0.0;
    }
    let (p, r) = (prec / orders as f64, rec / orders as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + beta2) * p * r / (beta2 * p + r)
}

/// SQuAD's answer normalisation: lower case, punctuation removed, the articles a, an and
/// the removed, whitespace collapsed.
pub fn normalize_answer(s: &str) -> Vec<String> {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !(c.is_ascii_punctuation()))
        .collect();
    // an article is a whole run of word characters (a regular expression's \b(a|an|the)\b)
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(no_punct.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if matches!(run.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in no_punct.chars() {
        if word(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.split(is_space)
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// 1 when the normalised answers are equal, else 0.
pub fn exact_match(hyp: &str, reference: &str) -> f64 {
    (normalize_answer(hyp) == normalize_answer(reference)) as u8 as f64
}

/// The F1 of the normalised answers' shared tokens (a multiset), 0 when none are shared.
pub fn token_f1(hyp: &str, reference: &str) -> f64 {
    let (h, r) = (normalize_answer(hyp), normalize_answer(reference));
    let mut counts: HashMap<&str, isize> = HashMap::new();
    for w in &r {
        *counts.entry(w).or_insert(0) += 1;
    }
    let mut same = 0;
    for w in &h {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let p = same as f64 / h.len() as f64;
    let rc = same as f64 / r.len() as f64;
    2.0 * p * rc / (p + rc)
}

/// Whitespace as Python's `str.split()` sees it.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn tokenizes_like_mteval_13a() {
        assert_eq!(
            tokenize_13a("Hello, world! It costs $3.50 (1,000-2,000).").join(" "),
            "Hello , world ! It costs $ 3.50 ( 1,000 - 2,000 ) ."
        );
        assert_eq!(
            tokenize_13a("l'eau &amp; le vin").join(" "),
            "l'eau & le vin"
        );
    }

    #[test]
    fn identical_text_scores_100_and_unrelated_text_0() {
        let r = s(&["le chat dort sur le lit .", "il fait beau aujourd'hui"]);
        assert!((corpus_bleu(&r, &r).score - 100.0).abs() < 1e-9);
        assert!((corpus_chrf(&r, &r) - 100.0).abs() < 1e-9);
        let h = s(&["xyz", "qqq"]);
        assert_eq!(corpus_bleu(&h, &r).score, 0.0);
    }
}
